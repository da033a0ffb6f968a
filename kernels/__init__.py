"""Fused kernels of the extraction and scoring hot paths, each paired with a torch reference.

Functions (validated, then dispatched by :mod:`fastinf.kernels.dispatch`: CUDA tensors go to the Triton
kernels, CPU tensors to the torch references in :mod:`fastinf.kernels.reference`):

- :func:`kron_project`  ``phi_b = sum_t m_bt (P_out g_bt)(P_in [x_bt, 1])ᵀ``, per-sample projected
  gradient of a linear layer in one pass over x and g (module ``kron``).
- :func:`embed_project` the same for an embedding table, ``P_in x_t`` -> column ``id_t`` of ``P_V``
  (module ``embed``).
- :func:`lowrank_apply` ``U diag(w) Uᵀ X + c X``, a low-rank + damping preconditioner applied to a
  block of vectors in one pass (module ``lowrank``).

``FASTINF_KERNELS=torch|triton|auto`` (environment) or :func:`use_backend` (context manager) forces a
path. Importing this package does not import Triton; the kernel modules load on first use.

Precision: accumulation is fp32 throughout; fp32 inputs use tf32x3 dots (rel. error ~1e-6), fp16/bf16
inputs tf32 dots on rounded operands (rel. error ~5e-4, below the inputs' own rounding). Tuning:
``kernels/_utils.py`` (per-GPU config tables), ``python -m fastinf.kernels.compile_check`` (compile for
sm_90/sm_80 without a GPU and report registers/spills), ``bench/gpu.py`` (checks and timings on a GPU).
The kernel paths are inference-only (no autograd); the references are differentiable.
"""
from __future__ import annotations

import torch

from fastinf.kernels import _checks, reference
from fastinf.kernels.dispatch import requested_backend, resolve, triton_module, use_backend

__all__ = ["kron_project", "embed_project", "lowrank_apply", "use_backend", "requested_backend", "backend_for",
           "reference"]


def backend_for(t: torch.Tensor, *others: torch.Tensor) -> str:
    """The path ("torch" or "triton") a call with these input tensors would take."""
    return resolve(t.device, tuple(o.dtype for o in (t, *others) if o.is_floating_point()))


def kron_project(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
                 P_out: torch.Tensor, *, bias: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample Kronecker projection of a linear layer's weight gradient, never forming it.

    ``phi_b = sum_t m_bt (P_out g_bt)(P_in [x_bt, 1])ᵀ``, accumulated in fp32.

    Args:
        x: (B, T, d_in) unit inputs (fp32/fp16/bf16). g: (B, T, d_out) gradients w.r.t. the unit outputs.
        mask: (B, T) token weights (1 keep, 0 padding; bool, integer or float), or None for all ones.
            Variable-length sequences are expressed by the mask; all-padding tiles cost no reads.
        P_in: (k_in, d_in + bias), last column = bias column when ``bias``. P_out: (k_out, d_out).
        bias: the unit has a bias (``x`` is implicitly extended with a constant 1).
        out_dtype: float32 (default), float16 or bfloat16.

    Returns:
        (B, k_out, k_in) tensor; flatten row-major for the (B, k_out * k_in) feature layout.
    """
    _checks.check_kron(x, g, mask, P_in, P_out, bias, out_dtype)
    if resolve(x.device, (x.dtype, g.dtype, P_in.dtype, P_out.dtype)) == "torch":
        return reference._kron(x, g, mask, P_in, P_out, bias, out_dtype)
    return triton_module("kron").kron_project(x, g, mask, P_in, P_out, bias=bias, out_dtype=out_dtype)


def embed_project(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
                  P_out: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample projection of an embedding table's gradient: ``sum_t m_bt (P_out g_bt) P_V[:, id_bt]ᵀ``.

    Args:
        ids: (B, T) integer token ids in ``[0, V)``. g: (B, T, d) gradients w.r.t. the embedding output.
        mask: (B, T) token weights or None. P_V: (k_in, V); a transposed view of a (V, k_in) contiguous
            matrix gives the kernel coalesced gathers. P_out: (k_out, d). out_dtype: as kron_project.

    Returns:
        (B, k_out, k_in) tensor.
    """
    _checks.check_embed(ids, g, mask, P_V, P_out, out_dtype)
    if resolve(g.device, (g.dtype, P_V.dtype, P_out.dtype)) == "torch":
        return reference._embed(ids, g, mask, P_V, P_out, out_dtype)
    return triton_module("embed").embed_project(ids, g, mask, P_V, P_out, out_dtype=out_dtype)


def lowrank_apply(X: torch.Tensor, U: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor, *,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``U diag(w) Uᵀ X + c X`` for X (k, n), U (k, r), w (r,), scalar c, in one fused pass over X.

    The Woodbury form of a rank-r + damping inverse curvature; to precondition row features Q (n, k)
    pass ``X=Q.T`` (a view) and transpose the result. Accumulates in fp32; ``out_dtype`` None keeps
    the dtype of X.
    """
    _checks.check_lowrank(X, U, w, c, out_dtype)
    dtypes = (X.dtype, U.dtype, w.dtype) + ((out_dtype,) if out_dtype is not None else ())
    if resolve(X.device, dtypes) == "torch":
        return reference._lowrank(X, U, w, c, out_dtype)
    return triton_module("lowrank").lowrank_apply(X, U, w, float(c), out_dtype=out_dtype)
