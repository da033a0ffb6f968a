"""Byte sizes and the cost formulas of the planner: how many bytes each stage of a run needs.

``parse_bytes``/``format_bytes`` read and print sizes ("16G", "1.5 GiB"), ``device_memory_bytes`` reports
the memory of the device a run uses, and the private ``_*_bytes``/``_largest_*`` functions are the
closed-form memory models of extraction, scoring and aggregation that :mod:`fastinf.extraction.plan`
combines into a :class:`~fastinf.extraction.plan.Plan` (see that module's docstring for the table of costs).
They live apart from the plan so that the formulas can be read (and tested) without the planning steps.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from fastinf.errors import ConfigError

META_BYTES_PER_SAMPLE = 8 + 8 + 4 + 8 + 1   # ids, label, loss, pred, correct (see fastinf.store)
MAX_BATCH = 4096
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def parse_bytes(text: str | int | float) -> int:
    """``"16G"``, ``"512MiB"``, ``"3.5GB"`` or a number of bytes -> bytes (binary units: G = 2**30)."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ConfigError(f"memory size must be positive, got {text}")
        return int(text)
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    mult = 1
    for suffix, m in (("K", 2**10), ("M", 2**20), ("G", 2**30), ("T", 2**40)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        val = float(s)
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}; expected e.g. '16G', '512M' or a byte count") from None
    if val <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return int(val * mult)


def format_bytes(n: float) -> str:
    """Human-readable binary size (``1.5 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def device_memory_bytes(device: Any = None) -> int:
    """Total memory of a CUDA ``device``, else the memory currently available to this process (CPU)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(total)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a test dependency, not a runtime one
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def store_bytes(n: int, feature_dims: dict[str, int], dtype: str, n_classes: int | None = None,
                extras: dict[str, tuple[tuple[int, ...], str]] | None = None) -> int:
    """Bytes the store's files of ``n`` rows take on disk (features, metadata, logits, extras; headers excluded)."""
    import numpy as np

    row = sum(feature_dims.values()) * _ITEMSIZE[dtype] + META_BYTES_PER_SAMPLE + 4 * int(n_classes or 0)
    for shape, dt in (extras or {}).values():
        row += int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    return int(n) * int(row)

# ---------------------------------------------------------------------------------------------- models

def _score_bytes(k: int, m: int, b: int, dtype: str) -> int:
    """One unit's scoring block: raw rows, float32 and float64 copies of them, float64 test features
    (and their float32 preconditioned source), the float64 product and the float32 block written."""
    return b * k * (_ITEMSIZE[dtype] + 4 + 8) + m * k * (4 + 8) + m * b * (8 + 4)


def _largest_block(ks: Sequence[int], m: int, dtype: str, budget: int, precond_bytes: int = 0) -> int:
    """Largest train block ``b`` whose worst unit's scoring memory plus ``precond_bytes`` fits ``budget``."""
    per_row = max(_score_bytes(k, m, 1, dtype) - _score_bytes(k, m, 0, dtype) for k in ks)
    fixed = max(_score_bytes(k, m, 0, dtype) for k in ks) + precond_bytes
    return int(max(0, (budget - fixed) // per_row))


def _largest_batch(free: int, per_sample: int, chunk_row: int, chunk_size: int | None) -> int:
    """Largest batch ``B`` (<= MAX_BATCH) with ``B * per_sample + chunk * chunk_row <= free``; the chunk
    is ``chunk_size`` or extraction's default of 16 batches (at most 4096 rows, at least one batch)."""
    best, lo, hi = 0, 1, MAX_BATCH
    while lo <= hi and free > 0:
        mid = (lo + hi) // 2
        c = chunk_size or max(mid, min(4096, mid * 16))
        if mid * per_sample + c * chunk_row <= free:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _agg_bytes(n: int, rows: int) -> int:
    """A slab of ``rows x N`` float32 scores, its float64 doubled ranks and argsort indices (int64),
    plus per-atom accumulators (two float64 N-vectors)."""
    return rows * n * (4 + 8 + 8) + 2 * 8 * n


def _precond_bytes(method: str, k: int, rank: int | None) -> int:
    if method in ("identity", "graddot", "gradcos", "tracin"):
        return 0
    if method == "if" and rank is not None and rank < k:
        return 8 * k * rank + 8 * rank
    return 8 * k * k  # exact IF inverse, DataInf's k x k operator, LiSSA's dense scratch


def _capture_bytes(unit: Any, spec: Any, T: int) -> int:
    """Bytes per sample the capture holds outside autograd's saved tensors (one call of the unit)."""
    if unit.kind == "embedding":
        x = 8 * T                                   # token ids (int64)
    elif spec.kind == "kron":
        x = 4 * T * spec.k_in                       # P_in [x, 1] projected inside the forward hook
    else:
        x = 4 * T * unit.d_in                       # raw x for exact projection
    g = 4 * T * unit.d_out                          # output gradient returned by autograd.grad
    if spec.kind == "exact":
        out = 4 * unit.exact_dim                    # the exact feature row
    else:
        out = 4 * (T * spec.k_out + spec.k_out * spec.k_in)  # P_out g and the feature row
    return x + g + out


def _analytic_activation_bytes(units: Sequence[Any], T: int) -> int:
    """Analytic activations per sample when no model is given: each unit's input and output, twice."""
    return sum(2 * 4 * T * (u.d_in + u.d_out) for u in units if u.kind != "embedding") + \
        sum(2 * 4 * T * u.d_out for u in units if u.kind == "embedding")


def fused_costs(n: int, m: int, ks: Sequence[int], item: int, atoms: int, groups: int, hows: int, *,
                block_bytes: int = 256 << 20, slab_bytes: int = 1 << 30) -> dict[str, int]:
    """Memory and disk of the fused score -> aggregate pass (``fastinf.influence``), mirroring its blocks.

    Test blocks of ``fastinf.score`` (``m_b`` rows; evened out when an ``m_b x N`` slab exceeds
    ``block_bytes``), sets of them whose slabs fit ``slab_bytes`` (one train pass per set and unit).
    Memory: the slabs of one set, the ranks and argsort of one slab (float64 + int64), the accumulators
    (one N-vector per atom and how), one decoded train block (store dtype + float32) and the GEMM output.
    Disk: the result Parquet (~40 bytes per train sample, group and how) and the resume state (the
    accumulators, one file replaced at each commit)."""
    k = max(list(ks) or [1])
    tb = int(max(1, min(m, 8192, block_bytes // (16 * k))))
    rows = tb if tb * n * 4 <= block_bytes else max(1, block_bytes // (4 * n))
    rows = tb if rows == tb else -(-m // -(-m // rows))
    n_blocks = -(-m // rows)
    sets = int(max(1, min(n_blocks, slab_bytes // max(1, rows * n * 4))))
    nb = int(max(64, min(1 << 22, block_bytes // (4 * (rows + 2 * k)), (256 << 20) // (4 * rows))))
    acc = atoms * hows * n * 8
    memory = sets * rows * n * 4 + rows * n * 16 + acc + min(nb, n) * (k * (item + 4) + rows * 4)
    result = n * groups * hows * 40
    return {"test_block": rows, "set_blocks": sets, "train_passes_per_unit": -(-n_blocks // sets),
            "memory_bytes": int(memory), "result_bytes": int(result), "state_bytes": int(acc),
            "disk_bytes": int(result + acc)}


def fused_atoms(units: Sequence[Any], groups: Sequence[str]) -> int:
    """Atoms of the fused pass: the distinct group memberships of the units (units in no group: none)."""
    from fastinf.errors import SelectorError
    from fastinf.extraction.units import select

    member: dict[str, frozenset[str]] = {}
    for g in groups:
        try:
            picked = select(list(units), g.replace("+", ","))
        except SelectorError:          # a group none of the planned units is in
            continue
        for u in picked:
            member[u.name] = member.get(u.name, frozenset()) | {g}
    return len(set(member.values()))
