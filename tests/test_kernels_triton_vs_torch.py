"""Triton kernels == torch references, on fresh random inputs, under the Triton interpreter on CPU.

Sweeps awkward shapes (odd, non-powers-of-two, larger than one block, T = 1, B = 1), dtypes (fp32,
fp16, bf16 inputs; fp32/fp16/bf16 outputs), masks (none, bool, float weights, ragged lengths, an all-
padding sample), strided inputs and token splits. Tolerances (max |kernel - ref| / max |ref|): 1e-5 for
fp32 in and out; 2e-3 for fp16/bf16 inputs (the kernels then use tf32 dots on rounded operands, which
the interpreter reproduces) or an fp16 output; 8e-3 for a bf16 output (its own rounding is 2^-9).
"""
from __future__ import annotations

import pytest
import torch

import fastinf.kernels as K
from fastinf.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



def tol(in_dt: torch.dtype, out_dt: torch.dtype = torch.float32) -> float:
    if out_dt == torch.bfloat16:
        return 8e-3
    return 1e-5 if in_dt == out_dt == torch.float32 else 2e-3


@pytest.fixture(scope="module")
def kern():
    """The kernel modules (imports Triton, interpreted: conftest sets TRITON_INTERPRET=1)."""
    from fastinf.kernels import _utils, embed, kron, lowrank
    assert _utils.INTERPRET, "kernel tests must run under TRITON_INTERPRET=1 on CPU"
    return kron, embed, lowrank


def _check(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {tuple(got.shape)}/{got.dtype} vs {tuple(want.shape)}/{want.dtype}"
    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().clamp_min(1e-30)
    err = float(diff.max() / scale)
    bad = int((diff > tol * scale).sum())
    assert err <= tol, f"{what}: rel. max error {err:.2e} > {tol:.0e}; {bad}/{diff.numel()} entries off"


def _mask(kind: str, B: int, T: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(B, T) > 0.3
    if kind == "float":
        return torch.rand(B, T)
    lengths = torch.randint(1, T + 1, (B,))            # ragged: variable-length sequences, right padding
    if B > 1:
        lengths[-1] = 0                                # one sample entirely padding
    return (torch.arange(T)[None, :] < lengths[:, None]).long()


KRON_SHAPES = [  # B, T, d_in, d_out, k_in, k_out, bias
    (3, 37, 21, 45, 16, 16, True),
    (1, 1, 5, 7, 3, 5, False),            # B = 1, T = 1, k < 16 (padded)
    (2, 70, 130, 67, 24, 17, True),       # d > one block, T > one tile, odd k
    (2, 20, 40, 30, 64, 64, False),       # 64 x 64
]


@pytest.mark.parametrize("shape", KRON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("in_dt,out_dt", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_kron_project_matches_reference(kern, shape, in_dt, out_dt):
    B, T, d_in, d_out, k_in, k_out, bias = shape
    x, g = torch.randn(B, T, d_in, dtype=in_dt), torch.randn(B, T, d_out, dtype=in_dt)
    P_in, P_out = torch.randn(k_in, d_in + bias), torch.randn(k_out, d_out)
    mask = _mask("ragged", B, T)
    want = reference.kron_project(x, g, mask, P_in, P_out, bias=bias, out_dtype=out_dt)
    with K.use_backend("triton"):
        got = K.kron_project(x, g, mask, P_in, P_out, bias=bias, out_dtype=out_dt)
    _check(got, want, tol(in_dt, out_dt), f"kron {shape} {in_dt}->{out_dt}")


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "ragged"])
def test_kron_project_masks(kern, mask_kind):
    B, T, d_in, d_out = 3, 29, 19, 23
    x, g = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    P_in, P_out = torch.randn(16, d_in + 1), torch.randn(16, d_out)
    mask = _mask(mask_kind, B, T)
    want = reference.kron_project(x, g, mask, P_in, P_out, bias=True)
    _check(kern[0].kron_project(x, g, mask, P_in, P_out, bias=True), want, 1e-5, f"kron mask={mask_kind}")


@pytest.mark.parametrize("splits", [2, 3, 70])
def test_kron_project_token_splits_sum_to_the_same_result(kern, splits):
    B, T, d_in, d_out = 2, 70, 33, 18
    x, g = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
    P_in, P_out = torch.randn(16, d_in), torch.randn(32, d_out)
    mask = _mask("ragged", B, T)
    want = reference.kron_project(x, g, mask, P_in, P_out, bias=False, out_dtype=torch.float16)
    got = kern[0].kron_project(x, g, mask, P_in, P_out, bias=False, out_dtype=torch.float16, splits=splits)
    _check(got, want, tol(torch.float32, torch.float16), f"kron splits={splits}")


def test_kron_project_strided_inputs_and_padding_invariance(kern):
    # x and g arrive as non-contiguous views; a sample's result must not depend on padding length
    B, T, d_in, d_out = 2, 24, 17, 11
    x = torch.randn(B, d_in, T).transpose(1, 2)                    # (B, T, d_in), stride 1 along T
    g = torch.randn(B, T, 2 * d_out)[:, :, ::2]                    # (B, T, d_out), stride 2 along d
    P_in, P_out = torch.randn(16, d_in + 1), torch.randn(16, d_out)
    mask = torch.ones(B, T)
    mask[:, 9:] = 0
    got = kern[0].kron_project(x, g, mask, P_in, P_out, bias=True)
    short = kern[0].kron_project(x[:, :9].contiguous(), g[:, :9].contiguous(), None, P_in, P_out, bias=True)
    _check(got, reference.kron_project(x, g, mask, P_in, P_out, bias=True), 1e-5, "kron strided")
    _check(got, short, 1e-5, "kron padded vs unpadded")


def test_kron_project_is_deterministic(kern):
    x, g = torch.randn(2, 50, 20), torch.randn(2, 50, 30)
    P_in, P_out = torch.randn(16, 20), torch.randn(16, 30)
    a = kern[0].kron_project(x, g, None, P_in, P_out, bias=False, splits=3)
    b = kern[0].kron_project(x, g, None, P_in, P_out, bias=False, splits=3)
    assert torch.equal(a, b)


EMBED_SHAPES = [  # B, T, V, d, k_in, k_out
    (3, 37, 50, 45, 16, 16),
    (1, 1, 7, 7, 3, 5),
    (2, 70, 1001, 130, 24, 17),
]


@pytest.mark.parametrize("shape", EMBED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("in_dt,out_dt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layout", ["k_by_V", "V_by_k_transposed"])
def test_embed_project_matches_reference(kern, shape, in_dt, out_dt, layout):
    B, T, V, d, k_in, k_out = shape
    ids, g = torch.randint(0, V, (B, T)), torch.randn(B, T, d, dtype=in_dt)
    P_V = torch.randn(k_in, V) if layout == "k_by_V" else torch.randn(V, k_in).T
    P_out = torch.randn(k_out, d)
    mask = _mask("ragged", B, T)
    want = reference.embed_project(ids, g, mask, P_V, P_out, out_dtype=out_dt)
    with K.use_backend("triton"):
        got = K.embed_project(ids, g, mask, P_V, P_out, out_dtype=out_dt)
    _check(got, want, tol(in_dt, out_dt), f"embed {shape} {in_dt}->{out_dt} {layout}")


def test_embed_project_token_splits(kern):
    B, T, V, d = 2, 45, 90, 20
    ids, g = torch.randint(0, V, (B, T)).int(), torch.randn(B, T, d)
    P_V, P_out = torch.randn(16, V), torch.randn(16, d)
    want = reference.embed_project(ids, g, None, P_V, P_out)
    _check(kern[1].embed_project(ids, g, None, P_V, P_out, splits=4), want, 1e-5, "embed splits")


LOWRANK_SHAPES = [  # k, n, r
    (37, 50, 5),
    (1, 1, 1),
    (256, 33, 200),      # rank above one register chunk: two chunks accumulated in fp32
    (300, 7, 17),
    (16, 70, 64),
]


@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_lowrank_apply_matches_reference(kern, shape, dt):
    k, n, r = shape
    X = torch.randn(n, k, dtype=dt).T                 # row features Q (n, k) passed as X = Q.T (a view)
    U, w = torch.linalg.qr(torch.randn(k, r))[0] if r <= k else torch.randn(k, r), torch.rand(r) - 0.5
    c = 0.25
    want = reference.lowrank_apply(X, U, w, c)
    with K.use_backend("triton"):
        got = K.lowrank_apply(X, U, w, c)
    _check(got, want, tol(dt, dt), f"lowrank {shape} {dt}")


def test_lowrank_apply_out_dtype_and_zero_damping(kern):
    X, U, w = torch.randn(40, 9, dtype=torch.float16), torch.randn(40, 8), torch.rand(8)
    want = reference.lowrank_apply(X, U, w, 0.0, out_dtype=torch.float32)
    got = kern[2].lowrank_apply(X, U, w, 0.0, out_dtype=torch.float32)
    _check(got, want, tol(torch.float16), "lowrank fp16 -> fp32, c = 0")
