"""Argument validation shared by the torch references and the Triton launchers.

Both back ends validate through these functions so that a bad call fails the same way, with the same
typed error, whichever path the dispatcher picks. Nothing here imports Triton.
"""
from __future__ import annotations

import torch

from fastinf.errors import ConfigError

#: dtypes the kernels read and write (accumulation is always fp32).
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    """``t`` must be a floating tensor with ``ndim`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if t.dim() != ndim:
        raise ConfigError(f"{name}: expected a {ndim}-D tensor, found shape {_shape(t)}")
    if not t.is_floating_point():
        raise ConfigError(f"{name}: expected a floating dtype, found {t.dtype}; cast it with .float()")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in KERNEL_DTYPES:
        raise ConfigError(f"out_dtype: expected one of float32/float16/bfloat16, found {out_dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors must live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        found = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ConfigError(f"expected all tensors on one device, found {found}; move them with .to(device)")
    return first


def check_mask(mask: torch.Tensor | None, B: int, T: int) -> None:
    """``mask`` is None (keep every token) or a (B, T) bool/integer/float tensor of token weights."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.shape != (B, T):
        found = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConfigError(f"mask: expected shape {B}x{T} (batch x tokens), found {found}")
    if mask.is_complex():
        raise ConfigError(f"mask: expected a bool, integer or real dtype, found {mask.dtype}")


def check_kron(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
               P_out: torch.Tensor, bias: bool, out_dtype: torch.dtype) -> None:
    """Validate the arguments of ``kron_project`` (shapes in its docstring)."""
    check_float("x", x, 3)
    check_float("g", g, 3)
    check_float("P_in", P_in, 2)
    check_float("P_out", P_out, 2)
    check_out_dtype(out_dtype)
    B, T, d_in = x.shape
    if g.shape[:2] != (B, T):
        raise ConfigError(f"g: expected batch x tokens = {B}x{T} like x, found shape {_shape(g)}")
    want_cols = d_in + int(bool(bias))
    if P_in.shape[1] != want_cols:
        extra = " (d_in + 1: the last column is the bias column)" if bias else ""
        raise ConfigError(f"P_in: expected {want_cols} columns{extra} for x with d_in={d_in}, "
                          f"found shape {_shape(P_in)}; pass bias={not bias} if the unit "
                          f"{'has no' if bias else 'has a'} bias")
    if P_out.shape[1] != g.shape[2]:
        raise ConfigError(f"P_out: expected {g.shape[2]} columns (d_out of g), found shape {_shape(P_out)}")
    check_mask(mask, B, T)
    check_same_device(x=x, g=g, mask=mask, P_in=P_in, P_out=P_out)


def check_embed(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
                P_out: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Validate the arguments of ``embed_project``, including that every token id indexes ``P_V``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        found = f"{ids.dtype} {_shape(ids)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"ids: expected a 2-D integer tensor of token ids (batch x tokens), found {found}")
    check_float("g", g, 3)
    check_float("P_V", P_V, 2)
    check_float("P_out", P_out, 2)
    check_out_dtype(out_dtype)
    B, T = ids.shape
    if g.shape[:2] != (B, T):
        raise ConfigError(f"g: expected batch x tokens = {B}x{T} like ids, found shape {_shape(g)}")
    if P_out.shape[1] != g.shape[2]:
        raise ConfigError(f"P_out: expected {g.shape[2]} columns (d_out of g), found shape {_shape(P_out)}")
    check_mask(mask, B, T)
    check_same_device(ids=ids, g=g, mask=mask, P_V=P_V, P_out=P_out)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= P_V.shape[1]:
            raise ConfigError(f"ids: expected token ids in [0, {P_V.shape[1]}) (the columns of P_V, the "
                              f"vocabulary size), found ids in [{lo}, {hi}]; check the tokenizer matches the model")


def check_lowrank(X: torch.Tensor, U: torch.Tensor, w: torch.Tensor, c: float | torch.Tensor,
                  out_dtype: torch.dtype | None) -> None:
    """Validate the arguments of ``lowrank_apply``: X (k, n), U (k, r), w (r,), scalar c."""
    check_float("X", X, 2)
    check_float("U", U, 2)
    check_float("w", w, 1)
    if U.shape[0] != X.shape[0]:
        raise ConfigError(f"U: expected {X.shape[0]} rows (the feature dim k of X, which is k x n), found shape "
                          f"{_shape(U)}; to precondition row features Q (n x k) pass X=Q.T")
    if w.shape[0] != U.shape[1]:
        raise ConfigError(f"w: expected {U.shape[1]} weights (one per column of U), found shape {_shape(w)}")
    if isinstance(c, torch.Tensor) and c.numel() != 1:
        raise ConfigError(f"c: expected a scalar damping, found a tensor of shape {_shape(c)}")
    if out_dtype is not None and out_dtype not in KERNEL_DTYPES + (torch.float64,):
        raise ConfigError(f"out_dtype: expected None or a float dtype, found {out_dtype}")
    check_same_device(X=X, U=U, w=w)
