"""Triton kernel: fused per-sample Kronecker projection of a linear layer's weight gradient.

``phi_b = sum_t m_bt (P_out g_bt)(P_in [x_bt, 1])ᵀ``  (B, k_out, k_in)

One program per (sample b, token split s). It walks its token range in tiles of BLOCK_T tokens; for
each tile it projects x and g on the fly (chunks of BLOCK_D features, tl.dot with fp32 accumulation,
inputs upcast to fp32 in registers; dot precisions: ``_utils.dot_precision``), weights the tokens by
the mask and adds the (k_out x k_in) outer product of the tile to an fp32 accumulator in registers.
Neither the (B, T, k) projections nor any (d_out, d_in) gradient ever reaches global memory. Tiles
whose mask is all zero (padding of variable-length sequences) are skipped without reading x or g.
With several splits each program writes an fp32 partial and the launcher sums them in a fixed order
(deterministic).

The torch reference of the same function is :func:`fastinf.kernels.reference.kron_project`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinf.kernels import _utils


@triton.jit
def _round_tf32(v):
    """Round fp32 to the nearest tf32 (10-bit mantissa, ties away from zero, as ``cvt.rna.tf32.f32``).

    Tensor cores read only the top 19 bits of an fp32 operand, i.e. they truncate: a biased error that
    adds up over long sums. Rounding first makes the tf32 error unbiased and half as large.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x1000) & -8192        # -8192 = 0xFFFFE000: clear the 13 low mantissa bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _project_tile(src_ptr, p_ptr, row_off, t_ok, D, stride_d, stride_pk, stride_pd,
                  offs_k, k_ok, PREC: tl.constexpr, ROUND: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr, KP: tl.constexpr):
    """(BLOCK_T, KP) fp32 = src[rows, :D] @ P[:, :D]ᵀ, looping over D in BLOCK_D chunks.

    ROUND (with PREC="tf32"): round the operands to tf32 first (fp16/bf16 inputs are already exact)."""
    acc = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        s = tl.load(src_ptr + row_off[:, None] + d[None, :] * stride_d,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_T, BLOCK_D)
        p = tl.load(p_ptr + offs_k[None, :] * stride_pk + d[:, None] * stride_pd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0).to(tl.float32)      # (BLOCK_D, KP)
        if ROUND:
            s = _round_tf32(s)
            p = _round_tf32(p)
        acc = tl.dot(s, p, acc, input_precision=PREC)
    return acc


@_utils.autotune("projection", key=["D_IN", "D_OUT", "KI", "KO"])
@triton.jit
def _kron_project_kernel(
    x_ptr, g_ptr, m_ptr, pin_ptr, pout_ptr, out_ptr,
    T, D_IN, D_OUT, K_IN, K_OUT, TOKENS_PER_SPLIT,
    sxb, sxt, sxd, sgb, sgt, sgd, smb, smt,
    spi_k, spi_d, spo_k, spo_d, sob, sos, sok, soi,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, KI: tl.constexpr, KO: tl.constexpr,
    PREC: tl.constexpr, ROUND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    t_begin = s * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_begin + TOKENS_PER_SPLIT, T)

    offs_ki = tl.arange(0, KI)
    offs_ko = tl.arange(0, KO)
    ki_ok = offs_ki < K_IN
    ko_ok = offs_ko < K_OUT
    if HAS_BIAS:   # column D_IN of P_in multiplies the implicit constant-1 input
        p_bias = tl.load(pin_ptr + offs_ki * spi_k + D_IN * spi_d, mask=ki_ok, other=0.0).to(tl.float32)

    acc = tl.zeros((KO, KI), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        if HAS_MASK:
            m = tl.load(m_ptr + b * smb + offs_t * smt, mask=t_ok, other=0.0)
        else:
            m = t_ok.to(tl.float32)
        if tl.max(tl.abs(m), axis=0) > 0:   # skip all-padding tiles without touching x or g
            px = _project_tile(x_ptr + b * sxb, pin_ptr, offs_t * sxt, t_ok, D_IN, sxd, spi_k, spi_d,
                               offs_ki, ki_ok, PREC, ROUND, BLOCK_T, BLOCK_D, KI)   # (BLOCK_T, KI)
            if HAS_BIAS:
                px += p_bias[None, :]
            px = px * m[:, None]
            pg = _project_tile(g_ptr + b * sgb, pout_ptr, offs_t * sgt, t_ok, D_OUT, sgd, spo_k, spo_d,
                               offs_ko, ko_ok, PREC, ROUND, BLOCK_T, BLOCK_D, KO)   # (BLOCK_T, KO)
            if ROUND:
                pg = _round_tf32(pg)
                px = _round_tf32(px)
            acc = tl.dot(tl.trans(pg), px, acc, input_precision=PREC)             # (KO, KI)

    out = out_ptr + b * sob + s * sos + offs_ko[:, None] * sok + offs_ki[None, :] * soi
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ko_ok[:, None] & ki_ok[None, :])


def split_tokens(B: int, T: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(number of splits, tokens per split) for a (B, T) batch; ``splits`` overrides the heuristic."""
    S = _utils.token_splits(B, T, device) if splits is None else int(splits)
    S = max(1, min(S, T))
    per = triton.cdiv(T, S)
    if S > 1 and not _utils.INTERPRET:
        per = triton.cdiv(per, _utils.TOKEN_ALIGN) * _utils.TOKEN_ALIGN
    return triton.cdiv(T, per), per


def launch_weighted_outer(B: int, T: int, k_out: int, k_in: int, device: torch.device,
                          out_dtype: torch.dtype, splits: int | None, launch) -> torch.Tensor:
    """Allocate the output (or the fp32 split partials), run ``launch(out, S, per, out_strides)``, reduce.

    Shared by the Kronecker and the embedding kernels, which differ only in how the input side is formed.
    The interpreter truncates fp32 -> bf16 instead of rounding, so there bf16 results go through an fp32
    buffer and torch's rounding.
    """
    S, per = split_tokens(B, T, device, splits)
    if S == 1 and not (_utils.INTERPRET and out_dtype == torch.bfloat16):
        out = torch.empty(B, k_out, k_in, device=device, dtype=out_dtype)
        launch(out, S, per, (out.stride(0), 0, out.stride(1), out.stride(2)))
        return out
    part = torch.empty(B, S, k_out, k_in, device=device, dtype=torch.float32)
    launch(part, S, per, part.stride())
    return part.sum(dim=1).to(out_dtype)   # fixed-order reduction over splits: deterministic


def kron_project(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
                 P_out: torch.Tensor, *, bias: bool, out_dtype: torch.dtype = torch.float32,
                 splits: int | None = None) -> torch.Tensor:
    """Launch the fused Kronecker projection. Arguments as :func:`fastinf.kernels.reference.kron_project`
    (already validated); ``splits`` forces the number of token splits (tests), None picks it for the GPU.

    x (B, T, d_in), g (B, T, d_out), mask (B, T) or None, P_in (k_in, d_in + bias), P_out (k_out, d_out)
    -> (B, k_out, k_in) of ``out_dtype``. Any strides are accepted (no copies of x or g).
    """
    B, T, d_in = x.shape
    d_out = g.shape[2]
    k_in, k_out = P_in.shape[0], P_out.shape[0]
    if B == 0 or T == 0:
        return torch.zeros(B, k_out, k_in, device=x.device, dtype=out_dtype)
    m = None if mask is None else mask.to(torch.float32)
    prec = _utils.dot_precision(x.dtype, g.dtype, P_in.dtype, P_out.dtype)

    def launch(out: torch.Tensor, S: int, per: int, so: tuple[int, ...]) -> None:
        mp, smb, smt = (x, 0, 0) if m is None else (m, m.stride(0), m.stride(1))
        _kron_project_kernel[(B, S)](
            x, g, mp, P_in, P_out, out,
            T, d_in, d_out, k_in, k_out, per,
            *x.stride(), *g.stride(), smb, smt,
            *P_in.stride(), *P_out.stride(), *so,
            HAS_MASK=m is not None, HAS_BIAS=bool(bias), KI=_utils.padded(k_in), KO=_utils.padded(k_out),
            PREC=prec, ROUND=prec == "tf32",
        )

    return launch_weighted_outer(B, T, k_out, k_in, x.device, out_dtype, splits, launch)
