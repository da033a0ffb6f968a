"""On a CUDA device: the compiled kernels (not the interpreter) match the torch references at realistic
shapes, and ``auto`` dispatch sends CUDA tensors to them. Skipped without CUDA (marker ``gpu``).

Run with the interpreter off: ``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_gpu.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastinf.kernels as K
from fastinf.kernels import reference

pytestmark = pytest.mark.gpu

# max |kernel - ref| / max |ref|: fp32 in/out (tf32x3 dots), half in (tf32 projection), half out (rounding)
TOL = {(torch.float32, torch.float32): 1e-5, (torch.float16, torch.float32): 2e-3,
       (torch.bfloat16, torch.float32): 2e-3, (torch.float16, torch.float16): 2e-3,
       (torch.bfloat16, torch.bfloat16): 8e-3}


@pytest.fixture(autouse=True)
def _compiled_kernels():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the GPU tests check compiled kernels: run them with TRITON_INTERPRET=0")


def _err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("B,T,d_in,d_out,k", [(64, 128, 384, 1536, 16), (3, 517, 1000, 333, 64), (1, 1, 7, 9, 16)])
@pytest.mark.parametrize("in_dt,out_dt", list(TOL))
def test_kron_project_cuda(B, T, d_in, d_out, k, in_dt, out_dt):
    dev = "cuda"
    x, g = torch.randn(B, T, d_in, device=dev, dtype=in_dt), torch.randn(B, T, d_out, device=dev, dtype=in_dt)
    P_in, P_out = torch.randn(k, d_in + 1, device=dev), torch.randn(k, d_out, device=dev)
    mask = torch.arange(T, device=dev)[None, :] < torch.randint(1, T + 1, (B, 1), device=dev)
    assert K.backend_for(x) == "triton"
    got = K.kron_project(x, g, mask, P_in, P_out, bias=True, out_dtype=out_dt)
    want = reference.kron_project(x, g, mask, P_in, P_out, bias=True, out_dtype=out_dt)
    assert _err(got, want) <= TOL[(in_dt, out_dt)]


@pytest.mark.parametrize("in_dt", [torch.float32, torch.bfloat16])
def test_embed_project_cuda(in_dt):
    dev, B, T, V, d, k = "cuda", 16, 200, 30522, 384, 16
    ids, g = torch.randint(0, V, (B, T), device=dev), torch.randn(B, T, d, device=dev, dtype=in_dt)
    P_V, P_out = torch.randn(V, k, device=dev).T, torch.randn(k, d, device=dev)
    got = K.embed_project(ids, g, None, P_V, P_out)
    want = reference.embed_project(ids, g, None, P_V, P_out)
    assert _err(got, want) <= TOL[(in_dt, torch.float32)]


@pytest.mark.parametrize("k,n,r", [(256, 4097, 64), (4096, 300, 200)])
def test_lowrank_apply_cuda(k, n, r):
    X = torch.randn(n, k, device="cuda").T
    U, w = torch.linalg.qr(torch.randn(k, r, device="cuda"))[0], torch.rand(r, device="cuda")
    assert _err(K.lowrank_apply(X, U, w, 0.1), reference.lowrank_apply(X, U, w, 0.1)) <= 1e-5
