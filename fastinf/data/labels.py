"""Checked texts and labels: nothing missing becomes a value, nothing fractional is truncated.

* A missing label (``None``, NaN, or a string such as ``""``/``"nan"``/``"null"``) is refused with the rows
  it sits on — never an extra class.
* A numeric label must be an integer class: ``1`` and ``1.0`` are class 1, ``1.7`` is refused (never 1).
* String labels (``"ham"``/``"spam"``) map to 0..C-1 in sorted order, the names kept.
* A missing text (``None``/NaN) is refused — never the string ``"None"``; bytes must be UTF-8.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastinf.errors import DataError

__all__ = ["MISSING_STRINGS", "checked_texts", "checked_labels", "labels_to_int"]

# label strings that mean "no label" (pandas/CSV conventions); compared lower-cased and stripped
MISSING_STRINGS = frozenset({"", "nan", "-nan", "null", "<na>", "n/a", "#n/a"})


def _rows(rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:8])
    return f"row {shown}" if len(rows) == 1 else f"rows {shown}" + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")


def _is_nan(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and math.isnan(float(v))


def _is_missing(v: Any) -> bool:
    return v is None or _is_nan(v) or (isinstance(v, str) and v.strip().lower() in MISSING_STRINGS)


def checked_texts(values: Sequence[Any], what: str, source: str) -> list[str]:
    """``values`` as strings; a missing (None/NaN) text or non-UTF-8 bytes is a DataError naming the rows."""
    missing = [i for i, v in enumerate(values) if v is None or _is_nan(v)]
    if missing:
        raise DataError(f"{source}: {what} is missing (null) at {_rows(missing)}; drop those rows or fill them in "
                        "(a missing text is never read as the string 'None')")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bytes, bytearray)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: {what} at row {i} is bytes that are not UTF-8; decode it first") from e
        out.append(v if isinstance(v, str) else str(v))
    return out


def _as_int(v: Any) -> int | None:
    """The integer class of a numeric label (None when ``v`` is not a number); fractions and inf raise."""
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            v = float(s)
        except ValueError:
            return None
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f) or f != math.floor(f):
            raise ValueError(repr(v))
        return int(f)
    return None


def _numeric(values: Sequence[Any], source: str) -> np.ndarray | None:
    """Integer classes of numeric labels, or None when some label is not numeric."""
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            k = _as_int(v)
        except ValueError:
            raise DataError(f"{source}: label {v!r} at row {i} is not an integer class; labels are never "
                            "truncated - round them yourself or use integer or string class labels") from None
        except OverflowError:
            raise DataError(f"{source}: label {v!r} at row {i} is too large for a class id") from None
        if k is None:
            if isinstance(v, (list, tuple, dict, np.ndarray)):
                raise DataError(f"{source}: label at row {i} is a {type(v).__name__}; fastinf needs one class "
                                "per sample")
            return None
        out[i] = k
    return out


def labels_to_int(values: Sequence[Any], source: str) -> tuple[np.ndarray, list[str] | None]:
    """Numeric labels as integer classes; string labels mapped to 0..C-1 in sorted order (names returned)."""
    missing = [i for i, v in enumerate(values) if _is_missing(v)]
    if missing:
        raise DataError(f"{source}: {len(missing)} label(s) missing (null, NaN or empty) at {_rows(missing)}; "
                        "drop those rows or label them (a missing label is never a class of its own)")
    arr = _numeric(values, source)
    if arr is not None:
        return arr, None
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in values], dtype=np.int64), names


def checked_labels(labels: Any, n: int, source: str) -> np.ndarray:
    """``labels`` as an int64 array of ``n`` class ids: integral, finite, none missing."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{source}: labels must be one class id per text, got an array of shape {arr.shape}")
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DataError(f"{source}: label(s) missing (NaN/inf) at {_rows(bad.tolist())}; drop those rows or "
                            "label them")
        frac = np.flatnonzero(arr != np.floor(arr))
        if frac.size:
            raise DataError(f"{source}: label {arr[frac[0]]!r} at row {int(frac[0])} is not an integer class; "
                            "labels are never truncated - round them yourself")
        out = arr.astype(np.int64)
    else:
        vals = arr.tolist()
        missing = [i for i, v in enumerate(vals) if _is_missing(v)]
        if missing:
            raise DataError(f"{source}: label(s) missing at {_rows(missing)}; drop those rows or label them")
        num = _numeric(vals, source)
        if num is None:
            raise DataError(f"{source}: labels must be integer class ids, got {type(vals[0]).__name__} values; "
                            "map class names to 0..C-1 first (the file loaders do)")
        out = num
    if out.shape != (n,):
        raise DataError(f"{source}: {out.shape[0]} labels for {n} texts")
    return out
