"""Torch references of the fused kernels: the same functions, written as plain fp32 matmuls.

These are the CPU path (the default without CUDA), the fallback selected by ``FASTINF_KERNELS=torch``,
and the ground truth that tests and ``bench/gpu.py`` compare the Triton kernels against. They
materialise the (B, T, k) projected intermediates that the kernels keep on chip; that is their only
difference from the kernels. Every function validates its arguments and raises
:class:`fastinf.errors.ConfigError` on a bad call.

- :func:`kron_project`  per-sample Kronecker projection of a linear layer's gradient
- :func:`embed_project` the same for an embedding table (column gather instead of ``P_in x``)
- :func:`lowrank_apply` ``U diag(w) Uᵀ X + c X``, the low-rank + damping preconditioner
"""
from __future__ import annotations

import torch

from fastinf.kernels import _checks

__all__ = ["kron_project", "embed_project", "lowrank_apply"]


def _weighted_outer(pg: torch.Tensor, px: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_t m_bt pg_bt px_btᵀ`` for pg (B, T, k_out) and px (B, T, k_in), fp32 -> (B, k_out, k_in)."""
    if mask is not None:
        pg = pg * mask.to(device=pg.device, dtype=torch.float32).unsqueeze(-1)
    return pg.transpose(1, 2) @ px


def kron_project(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
                 P_out: torch.Tensor, *, bias: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample two-sided projection of a linear layer's weight gradient, never forming it.

    ``phi_b = sum_t m_bt (P_out g_bt)(P_in [x_bt, 1])ᵀ`` computed in fp32.

    Args:
        x: (B, T, d_in) unit inputs. g: (B, T, d_out) gradients w.r.t. the unit outputs.
        mask: (B, T) token weights (1 keep, 0 padding; bool, integer or float) or None for all ones.
        P_in: (k_in, d_in + bias) input-side projection; with ``bias`` its last column multiplies the
            implicit constant-1 input of the bias. P_out: (k_out, d_out) output-side projection.
        bias: whether the unit has a bias (``x`` is extended with a ones column).
        out_dtype: dtype of the result (float32, float16 or bfloat16).

    Returns:
        (B, k_out, k_in) tensor of ``out_dtype`` on the device of ``x``.
    """
    _checks.check_kron(x, g, mask, P_in, P_out, bias, out_dtype)
    return _kron(x, g, mask, P_in, P_out, bias, out_dtype)


def _kron(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
          P_out: torch.Tensor, bias: bool, out_dtype: torch.dtype) -> torch.Tensor:
    d_in = x.shape[2]
    P_in32 = P_in.float()
    px = x.float() @ P_in32[:, :d_in].T                       # (B, T, k_in)
    if bias:
        px = px + P_in32[:, d_in]
    pg = g.float() @ P_out.float().T                          # (B, T, k_out)
    return _weighted_outer(pg, px, mask).to(out_dtype)


def embed_project(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
                  P_out: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample projection of an embedding table's gradient: ``P_in x_t`` becomes column ``id_t`` of P_V.

    ``phi_b = sum_t m_bt (P_out g_bt) P_V[:, id_bt]ᵀ`` computed in fp32.

    Args:
        ids: (B, T) integer token ids, each in ``[0, V)``. g: (B, T, d) gradients w.r.t. the embeddings.
        mask: (B, T) token weights or None. P_V: (k_in, V) vocabulary-side projection.
        P_out: (k_out, d) hidden-side projection. out_dtype: dtype of the result.

    Returns:
        (B, k_out, k_in) tensor of ``out_dtype``.
    """
    _checks.check_embed(ids, g, mask, P_V, P_out, out_dtype)
    return _embed(ids, g, mask, P_V, P_out, out_dtype)


def _embed(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
           P_out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    px = P_V.float().T[ids.long()]                            # (B, T, k_in)
    pg = g.float() @ P_out.float().T                          # (B, T, k_out)
    return _weighted_outer(pg, px, mask).to(out_dtype)


def lowrank_apply(X: torch.Tensor, U: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor, *,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Apply a low-rank + damping operator to a block of vectors: ``U diag(w) Uᵀ X + c X``.

    With ``H = V diag(s) Vᵀ + λI`` truncated to rank r, ``H⁻¹ ≈ U diag(w) Uᵀ + c I`` (Woodbury), so one
    call preconditions a block of features. Computed in fp32 (float64 if X or U is float64).

    Args:
        X: (k, n) block of n column vectors; to precondition row features Q (n, k) pass ``Q.T``.
        U: (k, r) basis. w: (r,) weights. c: scalar damping term.
        out_dtype: dtype of the result; None keeps the dtype of X.

    Returns:
        (k, n) tensor.
    """
    _checks.check_lowrank(X, U, w, c, out_dtype)
    return _lowrank(X, U, w, c, out_dtype)


def _lowrank(X: torch.Tensor, U: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor,
             out_dtype: torch.dtype | None) -> torch.Tensor:
    acc = torch.float64 if torch.float64 in (X.dtype, U.dtype) else torch.float32
    Xa, Ua = X.to(acc), U.to(acc)
    c = float(c)
    Y = (Ua * w.to(acc)) @ (Ua.T @ Xa)                        # (k, n)
    if c != 0.0:
        Y = Y + c * Xa
    return Y.to(out_dtype or X.dtype)
