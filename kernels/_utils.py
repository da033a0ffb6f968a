"""Shared Triton helpers: interpreter detection, block/config heuristics, dot precision.

Importing this module imports Triton; only the kernel modules (``kron``, ``embed``, ``lowrank``) do,
and they are loaded lazily by :mod:`fastinf.kernels.dispatch` the first time a Triton path is taken.

Autotuning: on a GPU each kernel is autotuned over 2-3 configs chosen for the device generation
(Hopper: sm_90; Ampere: sm_80/86/89, also used for other GPUs) and the call's class (dot precision,
projection size), keyed on the reduction sizes and projection dims (never on the token count, which
varies batch to batch); results are cached on disk by Triton. Under the interpreter
(``TRITON_INTERPRET=1``) one large-block config is used, since every loop iteration there costs Python
time. ``FASTINF_TRITON_AUTOTUNE=0`` takes the first config of the class without timing (a cheap first
call, e.g. for quick correctness runs).
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


def _arch() -> str:
    return "hopper" if _capability()[0] >= 9 else "ampere"


# Candidate configs per GPU generation and kernel class, as (block_a, block_b, num_warps, num_stages).
# Classes: "tf32" (half inputs: tf32 dots) or "x3" (fp32 inputs: tf32x3 or ieee dots, ~3x the operand
# registers), and for the projections "small" (k <= 16) or "big" (k >= 32) projection dims. Every entry
# was compiled for sm_90 / sm_80 with Triton 3.7 at the class's largest k (64) and its resources read
# with ``python -m fastinf.kernels.compile_check``: no register spills on sm_90; on sm_80 only the
# embedding kernel's fp32 64x64 class spills (16-32 bytes). Wider tiles spill hundreds of bytes.
_PROJECTION_TABLE: dict[str, dict[tuple[str, str], list[tuple[int, int, int, int]]]] = {
    # (BLOCK_T, BLOCK_D, num_warps, num_stages)
    "hopper": {
        ("small", "tf32"): [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3)],
        ("big", "tf32"): [(64, 32, 8, 3), (64, 16, 8, 3), (32, 32, 8, 3)],
        ("small", "x3"): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 1)],
        ("big", "x3"): [(32, 32, 8, 2), (32, 64, 8, 1)],
    },
    "ampere": {
        ("small", "tf32"): [(128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3)],
        ("big", "tf32"): [(64, 32, 8, 3), (32, 32, 8, 3), (64, 16, 8, 3)],
        ("small", "x3"): [(128, 32, 8, 3), (64, 32, 4, 3)],
        ("big", "x3"): [(32, 32, 8, 2), (32, 64, 8, 1)],
    },
}
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of lowrank_apply, with rank chunks of RANK_CHUNK
_LOWRANK_TABLE: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "hopper": {"tf32": [(64, 32, 8, 2), (128, 32, 8, 3)], "x3": [(64, 32, 8, 2), (32, 32, 8, 2)]},
    "ampere": {"tf32": [(64, 32, 8, 2), (128, 32, 8, 3)], "x3": [(32, 32, 8, 2)]},
}

#: Largest padded rank held in registers at once by ``lowrank_apply``; larger ranks loop over chunks.
RANK_CHUNK = 64


def _config(names: tuple[str, str], entry: tuple[int, int, int, int]) -> triton.Config:
    a, b, warps, stages = entry
    return triton.Config({names[0]: a, names[1]: b}, num_warps=warps, num_stages=stages)


def _entry(c: triton.Config, names: tuple[str, str]) -> tuple[int, int, int, int]:
    return (c.kwargs[names[0]], c.kwargs[names[1]], c.num_warps, c.num_stages)


def _union(tables: list[list[tuple[int, int, int, int]]], names: tuple[str, str]) -> list[triton.Config]:
    seen: list[tuple[int, int, int, int]] = []
    for table in tables:
        seen += [e for e in table if e not in seen]
    return [_config(names, e) for e in seen]


_PROJ_NAMES = ("BLOCK_T", "BLOCK_D")
_LOWRANK_NAMES = ("BLOCK_N", "BLOCK_K")


def projection_configs() -> list[triton.Config]:
    """Configs of the token-tile x feature-chunk projection kernels (``kron``, ``embed``): BLOCK_T
    tokens per tile, BLOCK_D features per chunk. All classes of the device; a call keeps its class's
    (see :func:`_prune_projection`)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 64, "BLOCK_D": 64}, num_warps=4, num_stages=1)]
    return _union(list(_PROJECTION_TABLE[_arch()].values()), _PROJ_NAMES)


def lowrank_configs() -> list[triton.Config]:
    """Configs of ``lowrank_apply``: BLOCK_N vectors per program, BLOCK_K features per chunk."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return _union(list(_LOWRANK_TABLE[_arch()].values()), _LOWRANK_NAMES)


def _precision_class(prec: object) -> str:
    return "tf32" if str(prec) == "tf32" else "x3"


def _keep(configs: list[triton.Config], allowed: list[tuple[int, int, int, int]],
          names: tuple[str, str]) -> list[triton.Config]:
    by_entry = {_entry(c, names): c for c in configs}
    kept = [by_entry[e] for e in allowed if e in by_entry] or configs[:1]     # in the class's order
    return kept if _autotune_enabled() else kept[:1]


def _prune_projection(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    """The call's class (projection size, dot precision), minus chunks wider than its reductions."""
    size = "small" if max(int(kwargs["KI"]), int(kwargs["KO"])) <= 16 else "big"
    allowed = _PROJECTION_TABLE[_arch()][(size, _precision_class(kwargs["PREC"]))]
    widest = padded(max(int(nargs.get("D_IN", 0) or 0), int(nargs.get("D_OUT", 0) or 0)))
    narrow = [e for e in allowed if e[1] <= widest] or allowed[:1]
    return _keep(configs, narrow, _PROJ_NAMES)


def _prune_lowrank(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    return _keep(configs, _LOWRANK_TABLE[_arch()][_precision_class(kwargs["PREC"])], _LOWRANK_NAMES)


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: a short warm-up and 20 ms of repetitions per config (the default spends
    125 ms), so that a first call on a new shape costs a few seconds, not tens."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(kind: str, key: list[str]):
    """``triton.autotune`` over the configs of ``kind`` ("projection" or "lowrank"), pruned per call to
    its class, with a short timer and the on-disk result cache."""
    configs, prune = ((projection_configs(), _prune_projection) if kind == "projection"
                      else (lowrank_configs(), _prune_lowrank))
    return triton.autotune(configs=configs, key=key, do_bench=_quick_bench, cache_results=True,
                           prune_configs_by={"early_config_prune": prune})


#: Token splits are multiples of this many tokens (a split may end inside a 128-token tile: masked).
TOKEN_ALIGN = 64


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
