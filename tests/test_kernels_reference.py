"""The torch references compute the documented math, checked against slow, obviously-right float64
versions that DO form the per-sample weight gradient (which the references and kernels never do)."""
from __future__ import annotations

import pytest
import torch

from fastinf.errors import ConfigError
from fastinf.kernels import reference


def _slow_kron(x, g, mask, P_in, P_out, bias):
    """float64: form grad W_b = sum_t m_bt g_bt [x_bt, 1]ᵀ token by token, then P_out grad W_b P_inᵀ."""
    B, T, _ = x.shape
    out = []
    for b in range(B):
        grad = torch.zeros(g.shape[2], P_in.shape[1], dtype=torch.float64)
        for t in range(T):
            m = 1.0 if mask is None else float(mask[b, t])
            xt = x[b, t].double()
            if bias:
                xt = torch.cat([xt, xt.new_ones(1)])
            grad += m * torch.outer(g[b, t].double(), xt)
        out.append(P_out.double() @ grad @ P_in.double().T)
    return torch.stack(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("B,T,d_in,d_out,k_in,k_out,bias", [
    (3, 7, 5, 6, 4, 3, True), (1, 1, 3, 2, 2, 5, False), (2, 11, 9, 13, 16, 16, True),
])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_kron_reference_matches_formed_gradient(B, T, d_in, d_out, k_in, k_out, bias, mask_kind):
    x, g = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    P_in, P_out = torch.randn(k_in, d_in + bias), torch.randn(k_out, d_out)
    mask = {"none": None, "bool": torch.rand(B, T) > 0.4, "float": torch.rand(B, T)}[mask_kind]
    got = reference.kron_project(x, g, mask, P_in, P_out, bias=bias)
    assert got.shape == (B, k_out, k_in) and got.dtype == torch.float32
    err = _rel(got, _slow_kron(x, g, mask, P_in, P_out, bias))
    assert err < 1e-5, f"reference kron_project off the formed-gradient result by {err:.2e} (rel. max)"


def test_embed_reference_is_kron_of_one_hot_tokens():
    B, T, V, d, k_in, k_out = 2, 9, 23, 7, 5, 6
    ids, g = torch.randint(0, V, (B, T)), torch.randn(B, T, d)
    mask = torch.rand(B, T) > 0.3
    P_V, P_out = torch.randn(k_in, V), torch.randn(k_out, d)
    one_hot = torch.nn.functional.one_hot(ids, V).float()          # (B, T, V): the embedding's input
    want = _slow_kron(one_hot, g, mask, P_V, P_out, bias=False)
    got = reference.embed_project(ids, g, mask, P_V, P_out)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("k,n,r,c", [(7, 5, 3, 0.5), (16, 1, 16, 0.0), (30, 9, 1, 2.0)])
def test_lowrank_reference_is_dense_operator(k, n, r, c):
    X, U, w = torch.randn(k, n), torch.randn(k, r), torch.randn(r)
    dense = U.double() @ torch.diag(w.double()) @ U.double().T + c * torch.eye(k, dtype=torch.float64)
    got = reference.lowrank_apply(X, U, w, c)
    assert got.dtype == X.dtype and _rel(got, dense @ X.double()) < 1e-5


def test_lowrank_reference_keeps_float64():
    X, U, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), torch.rand(2)
    got = reference.lowrank_apply(X, U, w, 0.1)
    want = (U * w.double()) @ (U.T @ X) + 0.1 * X
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_out_dtype_is_a_rounding_of_the_fp32_result():
    x, g = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    P_in, P_out = torch.randn(16, 4), torch.randn(16, 3)
    full = reference.kron_project(x, g, None, P_in, P_out, bias=False)
    for dt in (torch.float16, torch.bfloat16):
        half = reference.kron_project(x, g, None, P_in, P_out, bias=False, out_dtype=dt)
        assert half.dtype == dt and torch.equal(half, full.to(dt))


@pytest.mark.parametrize("bad,match", [
    (dict(P_in=torch.randn(4, 5)), "expected 6 columns"),            # bias=True needs d_in + 1 columns
    (dict(mask=torch.ones(2, 4)), "mask: expected shape 2x5"),
    (dict(g=torch.randn(3, 5, 3)), "g: expected batch x tokens = 2x5"),
    (dict(P_out=torch.randn(4, 2)), "P_out: expected 3 columns"),
    (dict(x=torch.randn(2, 5)), "x: expected a 3-D tensor"),
    (dict(out_dtype=torch.int32), "out_dtype"),
])
def test_kron_rejects_bad_arguments_with_a_clear_message(bad, match):
    args = dict(x=torch.randn(2, 5, 5), g=torch.randn(2, 5, 3), mask=None, P_in=torch.randn(4, 6),
                P_out=torch.randn(4, 3), out_dtype=torch.float32)
    args.update(bad)
    with pytest.raises(ConfigError, match=match):
        reference.kron_project(args["x"], args["g"], args["mask"], args["P_in"], args["P_out"], bias=True,
                               out_dtype=args["out_dtype"])


def test_embed_rejects_out_of_vocabulary_ids():
    with pytest.raises(ConfigError, match=r"token ids in \[0, 10\).*found ids in \[0, 10\]"):
        reference.embed_project(torch.tensor([[0, 10]]), torch.randn(1, 2, 3), None, torch.randn(4, 10),
                                torch.randn(4, 3))


def test_lowrank_rejects_row_major_features_with_a_hint():
    with pytest.raises(ConfigError, match="pass X=Q.T"):
        reference.lowrank_apply(torch.randn(5, 8), torch.randn(8, 2), torch.rand(2), 0.1)
