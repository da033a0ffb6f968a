"""Integrity checks of a store on read: the manifest's shape, the ``.npy`` headers and file sizes.

A store is never used on trust. ``read_manifest`` refuses a manifest that is unreadable, not a JSON
object, or lacks (or mis-shapes) a field the reader relies on — a complete store without per-chunk
``checksums`` is refused rather than read unchecked. ``check_array_file`` compares each array file's
``.npy`` header (dtype, shape, order, data offset) and size with the manifest, so a header edited to
another dtype of the same item size (``<f2`` -> ``<i2``) is named even though its bytes still checksum.
Every problem names the file (and field) and says what to do.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fastinf.errors import CorruptStoreError, StoreError
from fastinf.store.format import FORMAT_VERSION, MANIFEST, META_FIELDS, ArraySpec, _npy_header, canonical_dtype

_UNIT_FIELDS = {"name": str, "kind": str, "block": int, "role": str, "d_out": int, "d_in": int,
                "bias": bool, "feature_dim": int}
_SHA = re.compile(r"[0-9a-f]{64}")
_REDO = "the store is damaged: re-extract it (or restore it from a copy)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_manifest(path: Path) -> dict:
    """The parsed, shape-checked manifest of the store at ``path`` (StoreError / CorruptStoreError if not)."""
    mpath = path / MANIFEST
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a store directory"
        raise StoreError(f"{path} {what}: it is not a fastinf GradientStore; create one with `fastinf extract` "
                         "or fastinf.extract()")
    if not mpath.is_file():
        raise StoreError(f"{path} is not a fastinf GradientStore (no {MANIFEST}); "
                         "create one with `fastinf extract` or fastinf.extract()")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except OSError as e:
        raise StoreError(f"cannot read {mpath} ({e.strerror}); check its permissions") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStoreError(f"{mpath} is not valid JSON ({e}); {_REDO}") from e
    if not isinstance(manifest, dict):
        raise CorruptStoreError(f"{mpath} is valid JSON but not a store manifest (a {type(manifest).__name__}, "
                                f"expected an object); {_REDO}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {manifest.get('format_version')!r}, this fastinf reads "
                         f"format {FORMAT_VERSION}; re-extract with this version")
    check_manifest(manifest, mpath)
    return manifest


def _bad(mpath: Path, field: str, why: str) -> CorruptStoreError:
    return CorruptStoreError(f"{mpath}: field {field!r} {why}; {_REDO}")


def check_manifest(m: Mapping[str, Any], mpath: Path) -> None:
    """Raise CorruptStoreError naming the first field of manifest ``m`` that is missing or mis-shaped."""
    ident = m.get("identity")
    if not isinstance(ident, dict) or not all(isinstance(ident.get(k), dict) for k in ("model", "projection")):
        raise _bad(mpath, "identity", "is missing or lacks its 'model' / 'projection' objects")
    if "fingerprint" not in ident["model"]:
        raise _bad(mpath, "identity.model", "has no 'fingerprint'")
    try:
        canonical_dtype(m.get("dtype"))
    except Exception:
        raise _bad(mpath, "dtype", f"is {m.get('dtype')!r}, not one of fp16/bf16/fp32") from None
    for key in ("n_samples", "chunk_size", "n_chunks"):
        if not _is_int(m.get(key)) or m[key] <= 0:
            raise _bad(mpath, key, f"is {m.get(key)!r}, expected a positive integer")
    if m["n_chunks"] != -(-m["n_samples"] // m["chunk_size"]):
        raise _bad(mpath, "n_chunks", f"is {m['n_chunks']}, but {m['n_samples']} rows in chunks of "
                                      f"{m['chunk_size']} make {-(-m['n_samples'] // m['chunk_size'])}")
    if not isinstance(m.get("complete"), bool):
        raise _bad(mpath, "complete", "is missing or not true/false")
    _check_units(m, mpath)
    _check_arrays(m, mpath)
    if m["complete"]:
        _check_checksums(m, mpath)
    if not isinstance(m.get("nonfinite", []), list):
        raise _bad(mpath, "nonfinite", "is not a list")


def _check_units(m: Mapping[str, Any], mpath: Path) -> None:
    units = m.get("units")
    if not isinstance(units, list) or not units:
        raise _bad(mpath, "units", "is missing or empty")
    for i, u in enumerate(units):
        if not isinstance(u, dict):
            raise _bad(mpath, f"units[{i}]", "is not an object")
        for key, typ in _UNIT_FIELDS.items():
            ok = isinstance(u.get(key), typ) and (typ is bool or not isinstance(u.get(key), bool))
            if not ok:
                raise _bad(mpath, f"units[{i}].{key}", f"is {u.get(key)!r}, expected a {typ.__name__}")


def _check_arrays(m: Mapping[str, Any], mpath: Path) -> None:
    arrays = m.get("arrays")
    if not isinstance(arrays, dict):
        raise _bad(mpath, "arrays", "is missing or not an object")
    need = [f"unit:{u['name']}" for u in m["units"]] + [f"meta:{f}" for f in META_FIELDS]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise _bad(mpath, "arrays", f"lacks {missing[:4]}")
    for key, a in arrays.items():
        if not isinstance(a, dict) or not isinstance(a.get("path"), str):
            raise _bad(mpath, f"arrays.{key}", "is not an object with a 'path'")
        rel = Path(a["path"])
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2:
            raise _bad(mpath, f"arrays.{key}.path", f"is {a['path']!r}, not a file inside the store")
        shape = a.get("row_shape")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise _bad(mpath, f"arrays.{key}.row_shape", f"is {shape!r}, expected a list of sizes")
        try:
            np.dtype(a.get("dtype"))
        except TypeError:
            raise _bad(mpath, f"arrays.{key}.dtype", f"is {a.get('dtype')!r}, not a numpy dtype") from None
        if np.dtype(a["dtype"]).kind not in "biuf":
            raise _bad(mpath, f"arrays.{key}.dtype", f"is {a['dtype']!r}, not a numeric dtype")


def _check_checksums(m: Mapping[str, Any], mpath: Path) -> None:
    sums = m.get("checksums")
    if not isinstance(sums, dict):
        raise CorruptStoreError(
            f"{mpath} marks the store complete but has no 'checksums' (a complete store records one per chunk "
            f"and file); without them corruption could not be detected, so it is refused: {_REDO}")
    for key in m["arrays"]:
        got = sums.get(key)
        if not isinstance(got, list) or len(got) != m["n_chunks"] or \
                not all(isinstance(s, str) and _SHA.fullmatch(s) for s in got):
            raise _bad(mpath, f"checksums.{key}", f"is not a list of {m['n_chunks']} sha256 digests")


def array_file_size(n: int, spec: ArraySpec) -> int:
    """Bytes of the ``.npy`` file of ``spec`` with ``n`` rows (header + data)."""
    return len(_npy_header(n, spec)) + n * spec.row_bytes


def check_array_file(p: Path, n: int, spec: ArraySpec, what: str) -> None:
    """Raise CorruptStoreError if ``p`` is missing, has another size, or its ``.npy`` header disagrees with
    the manifest (dtype, shape, order or data offset). ``what`` names the array in the message."""
    if not p.is_file():
        raise CorruptStoreError(f"{what} is missing; re-extract the store")
    want = array_file_size(n, spec)
    got = p.stat().st_size
    if got != want:
        raise CorruptStoreError(f"{what} is {got} bytes, expected {want} (truncated or overwritten); "
                                "re-extract the store")
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise CorruptStoreError(f"{what} has a damaged .npy header ({e}); re-extract the store") from e
    expect = (n, *spec.row_shape)
    if dtype != np.dtype(spec.dtype) or tuple(shape) != expect or fortran or offset != len(_npy_header(n, spec)):
        raise CorruptStoreError(
            f"{what} has a .npy header that disagrees with the manifest (dtype {dtype.str}, shape {tuple(shape)}"
            f"{', Fortran order' if fortran else ''}; expected dtype {np.dtype(spec.dtype).str}, shape {expect}): "
            "its data would be misread; re-extract the store")
