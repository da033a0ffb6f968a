"""Triton kernel: low-rank + damping preconditioner applied to a block of vectors.

``Y = U diag(w) Uᵀ X + c X``   X (k, n), U (k, r), w (r,), c scalar   -> Y (k, n)

One program per tile of BLOCK_N columns of X. For each chunk of at most RANK_CHUNK basis vectors it
forms ``Z = diag(w) Uᵀ X_tile`` (r_c, BLOCK_N) in registers (loop over k in BLOCK_K chunks), then
writes ``U Z + c X_tile`` chunk by chunk of k. The tile of X is read twice (the second time from L2),
and neither ``Uᵀ X`` nor ``U diag(w) Uᵀ`` reaches global memory. With several rank chunks (r > 64) the
program re-reads its tile per chunk and adds each chunk's contribution to its own fp32 output tile, so
the result stays deterministic.

The torch reference of the same function is :func:`fastinf.kernels.reference.lowrank_apply`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinf.kernels import _utils
from fastinf.kernels.kron import _round_tf32


@_utils.autotune("lowrank", key=["K", "R"])
@triton.jit
def _lowrank_apply_kernel(
    x_ptr, u_ptr, w_ptr, out_ptr,
    K, N, R, c,
    sxk, sxn, suk, sur, sw, sok, son,
    RC: tl.constexpr, PREC: tl.constexpr, ROUND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    for r0 in range(0, R, RC):
        offs_r = r0 + tl.arange(0, RC)
        r_ok = offs_r < R
        z = tl.zeros((RC, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k0
            k_ok = k < K
            u = tl.load(u_ptr + k[:, None] * suk + offs_r[None, :] * sur,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_K, RC)
            x = tl.load(x_ptr + k[:, None] * sxk + offs_n[None, :] * sxn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_K, BLOCK_N)
            if ROUND:   # tf32 operands rounded, not truncated (see kron._round_tf32)
                u = _round_tf32(u)
                x = _round_tf32(x)
            z = tl.dot(tl.trans(u), x, z, input_precision=PREC)                          # (RC, BLOCK_N)
        wv = tl.load(w_ptr + offs_r * sw, mask=r_ok, other=0.0).to(tl.float32)
        z = z * wv[:, None]
        if ROUND:
            z = _round_tf32(z)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k0
            k_ok = k < K
            io_mask = k_ok[:, None] & n_ok[None, :]
            u = tl.load(u_ptr + k[:, None] * suk + offs_r[None, :] * sur,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_K, RC)
            if ROUND:
                u = _round_tf32(u)
            out = out_ptr + k[:, None] * sok + offs_n[None, :] * son
            if r0 == 0:
                x = tl.load(x_ptr + k[:, None] * sxk + offs_n[None, :] * sxn, mask=io_mask, other=0.0)
                y = c * x.to(tl.float32)
            else:   # later rank chunks add to this program's own fp32 tile
                y = tl.load(out, mask=io_mask, other=0.0).to(tl.float32)
            y = tl.dot(u, z, y, input_precision=PREC)                                    # (BLOCK_K, BLOCK_N)
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=io_mask)


def lowrank_apply(X: torch.Tensor, U: torch.Tensor, w: torch.Tensor, c: float, *,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch the fused ``U diag(w) Uᵀ X + c X``. Arguments as :func:`fastinf.kernels.reference.lowrank_apply`
    (already validated, kernel dtypes only). X (k, n) with any strides, U (k, r), w (r,) -> (k, n)."""
    K, N = X.shape
    R = U.shape[1]
    out_dtype = out_dtype or X.dtype
    if R == 0 or N == 0 or K == 0:
        return (float(c) * X.float()).to(out_dtype)
    RC = min(_utils.padded(R), _utils.RANK_CHUNK)
    chunks = triton.cdiv(R, RC)
    # partial sums stay fp32; so do bf16 results under the interpreter, which truncates fp32 -> bf16
    direct = chunks == 1 and not (_utils.INTERPRET and out_dtype == torch.bfloat16)
    buf_dtype = out_dtype if direct else torch.float32
    out = torch.empty(K, N, device=X.device, dtype=buf_dtype)
    prec = _utils.dot_precision(X.dtype, U.dtype, w.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lowrank_apply_kernel[grid](
        X, U, w, out, K, N, R, float(c),
        *X.stride(), *U.stride(), w.stride(0), *out.stride(),
        RC=RC, PREC=prec, ROUND=prec == "tf32",
    )
    return out if buf_dtype == out_dtype else out.to(out_dtype)
