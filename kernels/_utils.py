"""Shared Triton helpers: interpreter detection, block/config heuristics, dot precision.

Importing this module imports Triton; only the kernel modules (``kron``, ``embed``, ``lowrank``) do,
and they are loaded lazily by :mod:`fastinf.kernels.dispatch` the first time a Triton path is taken.

Autotuning: on a GPU each kernel is autotuned over a short list of configs chosen for the device
generation (Hopper: sm_90, Ampere: sm_80/86/89; other GPUs get the Ampere list), keyed on the
reduction sizes and projection dims (never on the token count, which varies batch to batch). Under
the interpreter (``TRITON_INTERPRET=1``) one large-block config is used, since every loop iteration
there costs Python time. ``FASTINF_TRITON_AUTOTUNE=0`` disables autotuning on a GPU (first config of
the list), which makes a first call cheap, e.g. for quick correctness runs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.testing
from triton import knobs

from fastinf.errors import ConfigError

#: True when the kernels are interpreted on the CPU (TRITON_INTERPRET=1 when they were decorated).
INTERPRET: bool = bool(knobs.runtime.interpret)


def padded(n: int) -> int:
    """Smallest power of two >= max(n, 16): tl.arange needs powers of two and tl.dot dims >= 16."""
    return max(16, triton.next_power_of_2(int(n)))


FP32_DOT_ENV = "FASTINF_TRITON_FP32_DOT"


def dot_precision(*dtypes: torch.dtype) -> str:
    """``tl.dot`` input precision for operands arriving in ``dtypes`` (all upcast to fp32 in registers).

    - Any half-precision operand: "tf32", with every operand rounded to tf32 in the kernel first
      (tensor cores would truncate). fp16/bf16 values are exact in tf32; the fp32 projection matrices
      and the projected tiles get an unbiased 2^-11 rounding, below the inputs' own (fp16 2^-11,
      bf16 2^-8): tensor-core speed at no accuracy cost.
    - All fp32: "tf32x3" (three tf32 MMAs on a big/small split of each operand): fp32-level accuracy
      (rel. ~1e-6, the 1e-5 contract) at tensor-core speed; FMA "ieee" dots would make the 64x64
      projection compute-bound. ``FASTINF_TRITON_FP32_DOT=ieee`` selects exact FMA dots instead.
    """
    if all(d == torch.float32 for d in dtypes):
        choice = os.environ.get(FP32_DOT_ENV, "tf32x3").strip().lower()
        if choice not in ("ieee", "tf32x3"):
            raise ConfigError(f"{FP32_DOT_ENV}: expected 'tf32x3' (default) or 'ieee', found {choice!r}")
        return choice
    return "tf32"


@functools.cache
def _capability() -> tuple[int, int]:
    if INTERPRET or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability()


def _autotune_enabled() -> bool:
    return os.environ.get("FASTINF_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _maybe_first(configs: list[triton.Config]) -> list[triton.Config]:
    return configs if _autotune_enabled() else configs[:1]


def projection_configs() -> list[triton.Config]:
    """Configs of the token-tile x feature-chunk projection kernels (``kron``, ``embed``).

    BLOCK_T tokens per tile, BLOCK_D input features per chunk of the on-the-fly projection.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 64, "BLOCK_D": 64}, num_warps=4, num_stages=1)]
    if _capability()[0] >= 9:   # Hopper: big shared memory, wgmma likes 64-row tiles and 8 warps
        configs = [
            triton.Config({"BLOCK_T": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 64, "BLOCK_D": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_D": 128}, num_warps=8, num_stages=2),
        ]
    else:                       # Ampere and older: smaller shared memory per SM
        configs = [
            triton.Config({"BLOCK_T": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_D": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 64, "BLOCK_D": 128}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_T": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
        ]
    return _maybe_first(configs)


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: a short warm-up and 20 ms of repetitions per config (the default spends
    125 ms), so that a first call on a new shape costs a few seconds, not tens."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _prune_wide_blocks(configs: list[triton.Config], nargs: dict, **_: object) -> list[triton.Config]:
    """Drop configs whose feature chunk (BLOCK_D) exceeds the widest reduction of the call."""
    widest = padded(max(int(nargs.get("D_IN", 0) or 0), int(nargs.get("D_OUT", 0) or 0)))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= widest]
    return kept or configs[:1]


def autotune(configs: list[triton.Config], key: list[str], prune: bool = False):
    """``triton.autotune`` with fastinf's timer and on-disk result cache (and optional pruning)."""
    return triton.autotune(configs=configs, key=key, do_bench=_quick_bench, cache_results=True,
                           prune_configs_by={"early_config_prune": _prune_wide_blocks} if prune else None)


#: Token splits are multiples of this many tokens (a split may end inside a 128-token tile: masked).
TOKEN_ALIGN = 64


def lowrank_configs() -> list[triton.Config]:
    """Configs of ``lowrank_apply``: BLOCK_N vectors per program, BLOCK_K features per chunk."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    ]
    return _maybe_first(configs)


#: Largest padded rank held in registers at once by ``lowrank_apply``; larger ranks loop over chunks.
RANK_CHUNK = 128


def token_splits(B: int, T: int, device: torch.device) -> int:
    """How many token ranges to split each sequence into so that the grid fills the GPU.

    One program per sample suffices when B is large; for few long sequences (B=4, T=4096) the token
    range is split, each split writes an fp32 partial and a deterministic second pass sums them.
    """
    if device.type != "cuda" or INTERPRET:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = 2 * sms
    if B >= target:
        return 1
    return max(1, min(triton.cdiv(T, TOKEN_ALIGN), triton.cdiv(target, B)))
