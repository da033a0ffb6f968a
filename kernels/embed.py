"""Triton kernel: fused per-sample projection of an embedding table's gradient.

``phi_b = sum_t m_bt (P_out g_bt) P_V[:, id_bt]ᵀ``  (B, k_out, k_in)

The Kronecker kernel (:mod:`fastinf.kernels.kron`) with its input side replaced: the projection of the
one-hot token ``P_in e_{id_t}`` is column ``id_t`` of ``P_V``, so the (BLOCK_T, k_in) tile is a gather
instead of a GEMM over the vocabulary. Same grid, token splits, tile skipping and fp32 accumulation.

The torch reference of the same function is :func:`fastinf.kernels.reference.embed_project`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinf.kernels import _utils
from fastinf.kernels.kron import _project_tile, _round_tf32, launch_weighted_outer


@_utils.autotune("projection", key=["D_OUT", "KI", "KO"])
@triton.jit
def _embed_project_kernel(
    ids_ptr, g_ptr, m_ptr, pv_ptr, pout_ptr, out_ptr,
    T, D_OUT, K_IN, K_OUT, TOKENS_PER_SPLIT,
    sib, sit, sgb, sgt, sgd, smb, smt,
    spv_k, spv_v, spo_k, spo_d, sob, sos, sok, soi,
    HAS_MASK: tl.constexpr, KI: tl.constexpr, KO: tl.constexpr,
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

    acc = tl.zeros((KO, KI), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        if HAS_MASK:
            m = tl.load(m_ptr + b * smb + offs_t * smt, mask=t_ok, other=0.0)
        else:
            m = t_ok.to(tl.float32)
        if tl.max(tl.abs(m), axis=0) > 0:   # skip all-padding tiles
            ids = tl.load(ids_ptr + b * sib + offs_t * sit, mask=t_ok, other=0).to(tl.int64)
            px = tl.load(pv_ptr + ids[:, None] * spv_v + offs_ki[None, :] * spv_k,
                         mask=t_ok[:, None] & ki_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_T, KI)
            px = px * m[:, None]
            pg = _project_tile(g_ptr + b * sgb, pout_ptr, offs_t * sgt, t_ok, D_OUT, sgd, spo_k, spo_d,
                               offs_ko, ko_ok, PREC, ROUND, BLOCK_T, BLOCK_D, KO)   # (BLOCK_T, KO)
            if ROUND:
                pg = _round_tf32(pg)
                px = _round_tf32(px)
            acc = tl.dot(tl.trans(pg), px, acc, input_precision=PREC)             # (KO, KI)

    out = out_ptr + b * sob + s * sos + offs_ko[:, None] * sok + offs_ki[None, :] * soi
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ko_ok[:, None] & ki_ok[None, :])


def embed_project(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
                  P_out: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
                  splits: int | None = None) -> torch.Tensor:
    """Launch the fused embedding projection. Arguments as :func:`fastinf.kernels.reference.embed_project`
    (already validated); ``splits`` forces the number of token splits (tests).

    ids (B, T), g (B, T, d), mask (B, T) or None, P_V (k_in, V), P_out (k_out, d) -> (B, k_out, k_in).
    """
    B, T = ids.shape
    d_out = g.shape[2]
    k_in, k_out = P_V.shape[0], P_out.shape[0]
    if B == 0 or T == 0:
        return torch.zeros(B, k_out, k_in, device=g.device, dtype=out_dtype)
    m = None if mask is None else mask.to(torch.float32)
    prec = _utils.dot_precision(g.dtype, P_V.dtype, P_out.dtype)

    def launch(out: torch.Tensor, S: int, per: int, so: tuple[int, ...]) -> None:
        mp, smb, smt = (g, 0, 0) if m is None else (m, m.stride(0), m.stride(1))
        _embed_project_kernel[(B, S)](
            ids, g, mp, P_V, P_out, out,
            T, d_out, k_in, k_out, per,
            *ids.stride(), *g.stride(), smb, smt,
            *P_V.stride(), *P_out.stride(), *so,
            HAS_MASK=m is not None, KI=_utils.padded(k_in), KO=_utils.padded(k_out),
            PREC=prec, ROUND=prec == "tf32",
        )

    return launch_weighted_outer(B, T, k_out, k_in, g.device, out_dtype, splits, launch)
