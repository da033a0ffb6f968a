"""The on-disk format of a GradientStore: layout constants, feature dtypes, array specs and npy headers.

Everything both the reader and the writer must agree on lives here. A store is a directory::

    manifest.json       identity (format, model fingerprint, units, projection, dtype, task, dataset
                        fingerprint), sample count, chunk size, completion flag, per-chunk checksums
    units/<i>.npy       feature array of unit i, shape [N, k] (np.lib.format; memory-mapped by readers)
    meta/<name>.npy     per-sample metadata: ids, label, loss, pred, correct, logits [N, C]
    extras/<name>.npy   optional arrays: tokens [N, L], embed_grads [N, L, d], reps [N, B, d]
    progress/rank-*.jsonl   (while writing) one JSON line per finished chunk with its checksums
    locks/              (while writing) one lock file per writer rank
    extract_config.json (CLI stores) the replayable command; precond/, index/ derived artifacts

``STORE_KIND`` is what ``--overwrite`` may replace: a directory whose ``manifest.json`` is a store's and whose
entries are all store entries (the above, ``LOCK`` and atomic-write temp files), never anything else.

Features are stored as fp16, bf16 (raw uint16, the top half of fp32) or fp32; ``to_storage`` and
``from_storage`` convert float32 rows to and from the stored dtype.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping

import numpy as np

from fastinf.errors import ConfigError
from fastinf.store.ownership import ArtifactKind

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_FIELDS = ("ids", "label", "loss", "pred", "correct")
RUN_CONFIG = "extract_config.json"   # the CLI's replayable command, written next to the store
STORE_ENTRIES = frozenset({"units", "meta", "extras", "progress", "locks", "precond", "index", "LOCK", MANIFEST,
                           RUN_CONFIG})
_TEMP = re.compile(r"(manifest|extract_config)\.json\.\d+\.tmp")


def _is_store_entry(name: str) -> bool:
    """Whether ``name`` may be a top-level entry of a store (its files, dirs and atomic-write temp files)."""
    return name in STORE_ENTRIES or bool(_TEMP.fullmatch(name))


def _is_store_manifest(m: Mapping[str, Any]) -> bool:
    """Whether a parsed ``manifest.json`` is a GradientStore's (complete or not)."""
    return isinstance(m.get("identity"), Mapping) and "format_version" in m and "n_chunks" in m \
        and isinstance(m.get("arrays"), Mapping)


# What ``--overwrite`` / ``overwrite=True`` may replace: a directory holding only a store's entries.
STORE_KIND = ArtifactKind("GradientStore", MANIFEST, entries=_is_store_entry, is_own=_is_store_manifest)
_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp32": "float32", "float32": "float32"}


def canonical_dtype(name: str) -> str:
    """Map 'fp16'|'bf16'|'fp32' (or numpy names) to the stored dtype name."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown store dtype {name!r}; use one of fp16, bf16, fp32") from None


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a stored dtype name. bfloat16 is stored as raw uint16 (the top half of fp32)."""
    name = canonical_dtype(name)
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float32 rows to the store's dtype (bf16: round-to-nearest-even into uint16)."""
    dtype = canonical_dtype(dtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "bfloat16":
        return x.astype(dtype)
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_storage(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Decode stored rows to float32 (into ``out`` [len(x), ...] float32 if given, which is returned).

    fp16 is widened by torch (vectorised, multi-threaded: ~5x numpy's ``astype``); reusing an ``out``
    buffer also saves the first-touch page faults of a fresh array on every block.
    """
    if canonical_dtype(dtype) == "bfloat16":
        wide = np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16
        if out is None:
            return wide.view(np.float32)
        out[...] = wide.view(np.float32)
        return out
    x = np.asarray(x)
    if x.dtype == np.float32 and out is None:
        return x
    import torch

    with warnings.catch_warnings():  # read-only memory maps: the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(x)
    if out is None:
        return src.float().numpy()
    torch.from_numpy(out).copy_(src)
    return out

def _unit_to_dict(unit: Any) -> dict:
    return dataclasses.asdict(unit) if dataclasses.is_dataclass(unit) else dict(unit)


def _unit_from_dict(d: Mapping[str, Any]) -> Any:
    from fastinf.extraction.units import Unit

    fields = {f.name for f in dataclasses.fields(Unit)}
    return Unit(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One on-disk array of the store: relative path, per-row shape and numpy dtype."""

    path: str
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype name as stored

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _npy_header(n: int, spec: ArraySpec) -> bytes:
    """The exact .npy header bytes for an [n, *row_shape] C-order array of spec.dtype."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(spec.dtype)), "fortran_order": False,
              "shape": (n, *spec.row_shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()
