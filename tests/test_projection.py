"""Projection operators against slow references, and the properties of the projection matrices."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from _models import one_thread  # noqa: F401 - module fixture, used via pytestmark
from fastinf.errors import ConfigError
from fastinf.extraction.projection import (ProjectionSpec, UnitProjector, _embed_project, _kron_project, feature_dim,
                                projection_matrices)
from fastinf.extraction.units import Unit

# awkward shapes: primes, k > d, a single token, a single sample
SHAPES = [(1, 1, 5, 3), (3, 7, 13, 11), (2, 5, 33, 17), (4, 1, 8, 40)]  # (B, T, d_in, d_out)
DIMS = [(16, 16), (4, 8), (7, 3), (64, 32)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _lin(d_out: int, d_in: int, bias: bool, name: str = "blk.0.fc") -> Unit:
    return Unit(name, "linear", 0, "mlp.up", d_out, d_in, bias)


def _grad_ref(x, g, mask, bias):
    """[∇W | ∇b] per sample in float64, by an explicit loop over tokens."""
    B, T, d_in = x.shape
    d_out = g.shape[-1]
    out = torch.zeros(B, d_out, d_in + int(bias), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            m = 1.0 if mask is None else float(mask[b, t])
            xt = x[b, t].double()
            if bias:
                xt = torch.cat([xt, torch.ones(1, dtype=torch.float64)])
            out[b] += m * torch.outer(g[b, t].double(), xt)
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_spec_parse_and_validation():
    assert ProjectionSpec.parse("16x16") == ProjectionSpec("kron", 16, 16, 0)
    assert ProjectionSpec.parse(" 64X32 ", seed=3) == ProjectionSpec("kron", 64, 32, 3)
    assert ProjectionSpec.parse("exact").kind == "exact"
    s = ProjectionSpec.parse("8x4", seed=2)
    assert ProjectionSpec.parse(s) is s and ProjectionSpec.from_dict(s.to_dict()) == s and str(s) == "8x4"
    for bad in ("16", "16x", "ax4", "16x16x16", ""):
        with pytest.raises(ConfigError, match="expected 'KOUTxKIN'"):
            ProjectionSpec.parse(bad)
    with pytest.raises(ConfigError, match="must be positive"):
        ProjectionSpec.parse("0x16")
    with pytest.raises(ConfigError, match="kind must be"):
        ProjectionSpec(kind="sjlt")
    with pytest.raises(ConfigError, match="seed"):
        ProjectionSpec(seed=-1)
    u = _lin(5, 3, True)
    assert feature_dim(u, ProjectionSpec.parse("4x2")) == 8 and feature_dim(u, ProjectionSpec.parse("exact")) == 5 * 3 + 5


@pytest.mark.parametrize("B,T,d_in,d_out", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kron_project_equals_projected_gradient(B, T, d_in, d_out, bias):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    x = torch.randn(B, T, d_in, generator=gen)
    g = torch.randn(B, T, d_out, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    u = _lin(d_out, d_in, bias)
    for k_out, k_in in DIMS:
        spec = ProjectionSpec("kron", k_out, k_in, seed=1)
        P_out, P_in = projection_matrices(u, spec)
        got = _kron_project(x, g, mask, P_in, P_out, bias)
        want = P_out.double() @ _grad_ref(x, g, mask, bias) @ P_in.double().T
        assert got.shape == (B, k_out, k_in) and got.dtype == torch.float32
        assert _rel(got, want) <= 1e-5, f"kron {k_out}x{k_in} shape {(B, T, d_in, d_out)} bias={bias}"
        proj = UnitProjector(u, spec).project(x, g, mask)
        torch.testing.assert_close(proj, got.reshape(B, -1), rtol=0, atol=0)


def test_exact_project_layout():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    for bias in (False, True):
        u = _lin(6, 5, bias)
        got = UnitProjector(u, ProjectionSpec.parse("exact")).project(x, g, mask)
        ref = _grad_ref(x, g, mask, bias)
        want = ref[:, :, :5].reshape(3, -1)
        if bias:
            want = torch.cat([want, ref[:, :, 5]], dim=1)   # ∇W row-major, then ∇b
        assert got.shape == (3, u.exact_dim) and _rel(got, want) <= 1e-6


def test_two_dim_inputs_are_one_token():
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 9, generator=gen), torch.randn(4, 3, generator=gen)
    u = _lin(3, 9, True)
    for spec in (ProjectionSpec.parse("4x4"), ProjectionSpec.parse("exact")):
        p = UnitProjector(u, spec)
        torch.testing.assert_close(p.project(x, g, None), p.project(x[:, None], g[:, None], torch.ones(4, 1)))


def test_embedding_gather_equals_one_hot_kron():
    gen = torch.Generator().manual_seed(2)
    V, d, B, T = 23, 6, 3, 5
    ids = torch.randint(0, V, (B, T), generator=gen)
    g = torch.randn(B, T, d, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    u = Unit("emb", "embedding", -1, "embed", d, V, False)
    onehot = torch.nn.functional.one_hot(ids, V).float()
    for spec in (ProjectionSpec.parse("4x8"), ProjectionSpec.parse("exact")):
        got = UnitProjector(u, spec).project(ids, g, mask)
        if spec.kind == "exact":
            want = _grad_ref(onehot, g, mask, False).reshape(B, -1)       # ∇(Eᵀ): hidden x vocabulary
        else:
            P_out, P_V = projection_matrices(u, spec)
            want = (P_out.double() @ _grad_ref(onehot, g, mask, False) @ P_V.double().T).reshape(B, -1)
            torch.testing.assert_close(_embed_project(ids, g, mask, P_V, P_out).reshape(B, -1), got)
        assert _rel(got, want) <= 1e-6, spec


def test_matrices_deterministic_and_distinct():
    u, spec = _lin(12, 20, True, "enc.layer.3.value"), ProjectionSpec.parse("8x8", seed=4)
    a = projection_matrices(u, spec)
    from fastinf.extraction import projection
    projection._cached_matrices.cache_clear()
    b = projection_matrices(u, spec)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert a[1].shape == (8, 21) and a[0].shape == (8, 12) and a[0].dtype == torch.float32
    others = [projection_matrices(_lin(12, 20, True, "enc.layer.4.value"), spec),
              projection_matrices(u, ProjectionSpec.parse("8x8", seed=5)),
              projection_matrices(_lin(12, 20, False, "enc.layer.3.value"), spec)]
    for o in others:
        assert not torch.allclose(o[0], a[0]), "matrices must depend on name, seed and shape"


def test_matrices_identical_in_a_fresh_process():
    """Same (seed, name, shape) -> same bytes in another interpreter (no salted hash(), no global RNG)."""
    code = ("import hashlib,torch;from fastinf.extraction.units import Unit;from fastinf.extraction.projection import *;"
            "torch.manual_seed(123);"
            "P=projection_matrices(Unit('m.h.1.attn.c_attn','linear',1,'attn.qkv',48,16,True),ProjectionSpec.parse('16x16',seed=7));"
            "print(hashlib.sha256(P[0].numpy().tobytes()+P[1].numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "99", "PATH": ""}).stdout.strip()
    import hashlib
    P = projection_matrices(Unit("m.h.1.attn.c_attn", "linear", 1, "attn.qkv", 48, 16, True),
                            ProjectionSpec.parse("16x16", seed=7))
    assert out == hashlib.sha256(P[0].numpy().tobytes() + P[1].numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("k,d", [(16, 64), (16, 17), (8, 8), (32, 12)])
def test_matrix_rows_orthonormal_and_scaled(k, d):
    P = projection_matrices(_lin(d, 5, False, f"m{k}_{d}"), ProjectionSpec("kron", k, 4, 0))[0].double()
    if k <= d:
        torch.testing.assert_close(P @ P.T, torch.eye(k, dtype=torch.float64) * d / k, rtol=0, atol=1e-5 * d / k)
    else:  # more rows than dims: orthonormal columns, inner products preserved exactly
        torch.testing.assert_close(P.T @ P, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-5)


def test_inner_products_preserved_in_expectation():
    """E[<P_out A P_inᵀ, P_out B P_inᵀ>] = <A, B>: average over many units (= independent matrices)."""
    gen = torch.Generator().manual_seed(3)
    d_out, d_in = 24, 20
    A = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    Bm = A + 0.7 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    true = float((A * Bm).sum())
    mats = [projection_matrices(_lin(d_out, d_in, False, f"u{i}"), ProjectionSpec.parse("6x5")) for i in range(300)]
    P_out = torch.stack([m[0] for m in mats]).double()                        # (300, 6, d_out)
    P_in = torch.stack([m[1] for m in mats]).double()                         # (300, 5, d_in)
    est = ((P_out @ A @ P_in.transpose(1, 2)) * (P_out @ Bm @ P_in.transpose(1, 2))).sum(dim=(1, 2))
    mean, se = float(est.mean()), float(est.std() / len(est) ** 0.5)
    assert abs(mean - true) < 4 * se, (f"projected inner product averages {mean:.2f} ± {se:.2f}, true {true:.2f}; "
                                       f"ratio {mean / true:.3f} (a factor k/d means a missing sqrt(d/k) scale)")


def test_projector_rejects_mismatched_shapes():
    u = _lin(6, 5, True)
    p = UnitProjector(u, ProjectionSpec())
    with pytest.raises(ConfigError, match="expected d_in=5"):
        p.project(torch.randn(2, 3, 4), torch.randn(2, 3, 6), None)
    with pytest.raises(ConfigError, match="expected d_out=6"):
        p.project(torch.randn(2, 3, 5), torch.randn(2, 3, 7), None)
    e = UnitProjector(Unit("emb", "embedding", -1, "embed", 6, 10, False), ProjectionSpec())
    with pytest.raises(ConfigError, match="integer token ids"):
        e.project(torch.randn(2, 3), torch.randn(2, 3, 6), None)
    with pytest.raises(ConfigError, match="'kron' ProjectionSpec"):
        projection_matrices(u, ProjectionSpec.parse("exact"))
