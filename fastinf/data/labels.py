"""Checked texts and labels: nothing missing becomes a value, nothing fractional is truncated.

* A missing label (``None``, NaN, or a string such as ``""``/``"nan"``/``"null"``) is refused with the rows
  it sits on — never an extra class.
* A numeric label must be an integer class: ``1`` and ``1.0`` are class 1, ``1.7`` is refused (never 1).
* String labels (``"ham"``/``"spam"``) map to 0..C-1 in sorted order, the names kept — or by a given
  ``label_names`` list (the training set's, a model's ``config.id2label``), an unknown name refused.
  :func:`align_label_names` maps a second split (a test file holding only some of the names) like the first.
* A regression score (fractional values such as STS-B's 0-5) is refused with a hint, or binarised by an
  explicit ``label_threshold`` (class 1 = score >= threshold).
* A missing text (``None``/NaN) is refused — never the string ``"None"``; bytes must be UTF-8.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastinf.errors import DataError

__all__ = ["MISSING_STRINGS", "checked_texts", "checked_labels", "labels_to_int", "align_label_names",
           "label_names_from_config"]

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
            raise DataError(f"{source}: label {v!r} at row {i} is not an integer class - this looks like a "
                            "regression score; labels are never truncated: set label_threshold (e.g. 3.0, "
                            "class 1 = score >= threshold) to binarise it, or use integer or string class "
                            "labels") from None
        except OverflowError:
            raise DataError(f"{source}: label {v!r} at row {i} is too large for a class id") from None
        if k is None:
            if isinstance(v, (list, tuple, dict, np.ndarray)):
                raise DataError(f"{source}: label at row {i} is a {type(v).__name__}; fastinf needs one class "
                                "per sample")
            return None
        out[i] = k
    return out


def _thresholded(values: Sequence[Any], threshold: float, source: str) -> tuple[np.ndarray, list[str]]:
    """Scores binarised at ``threshold``: class 1 = score >= threshold (the paper's rule for scored pairs)."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise DataError(f"{source}: label_threshold must be a number, got {threshold!r}") from None
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            f = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise DataError(f"{source}: label {v!r} at row {i} is not a number; label_threshold binarises "
                            "numeric scores only") from None
        if not math.isfinite(f):
            raise DataError(f"{source}: label {v!r} at row {i} is not finite; drop or fix that row")
        out[i] = int(f >= t)
    return out, [f"< {t:g}", f">= {t:g}"]


def _by_names(values: Sequence[Any], names: Sequence[str], source: str) -> np.ndarray:
    """String labels mapped by their position in ``names``; a name not in the list is refused."""
    index = {str(n): i for i, n in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        k = index.get(str(v).strip())
        if k is None:
            raise DataError(f"{source}: label {v!r} at row {i} is not one of the label names {list(names)}; "
                            "fix the label or list every class in label_names")
        out[i] = k
    return out


def labels_to_int(values: Sequence[Any], source: str, *, label_names: Sequence[str] | None = None,
                  label_threshold: float | None = None) -> tuple[np.ndarray, list[str] | None]:
    """Integer classes of ``values`` and their names (None for plain integer labels).

    Numeric labels are integer classes as they are (``label_names``, when given, must cover them); string
    labels map by ``label_names`` when given, else to 0..C-1 in sorted order; ``label_threshold`` binarises
    numeric scores."""
    missing = [i for i, v in enumerate(values) if _is_missing(v)]
    if missing:
        raise DataError(f"{source}: {len(missing)} label(s) missing (null, NaN or empty) at {_rows(missing)}; "
                        "drop those rows or label them (a missing label is never a class of its own)")
    if label_threshold is not None:
        return _thresholded(values, label_threshold, source)
    names = None if label_names is None else [str(n) for n in label_names]
    if all(isinstance(v, str) and _as_number_or_none(v) is None for v in values) and values:
        if names is not None:
            return _by_names(values, names, source), names
        names = sorted({str(v).strip() for v in values})
        return _by_names(values, names, source), names
    arr = _numeric(values, source)
    if arr is None:
        raise DataError(f"{source}: labels mix numbers and names; use one kind of label per file")
    if names is not None and arr.size and (arr.min() < 0 or arr.max() >= len(names)):
        bad = int(arr[(arr < 0) | (arr >= len(names))][0])
        raise DataError(f"{source}: label {bad} is not a class of label_names {names} (0..{len(names) - 1})")
    return arr, names


def _as_number_or_none(v: str) -> float | None:
    try:
        return float(v.strip())
    except ValueError:
        return None


def align_label_names(ds: Any, reference: Any) -> Any:
    """``ds`` with its labels mapped onto ``reference``'s label names (a TextDataset or a list of names).

    A test file holding only ``"spam"`` is mapped per file to class 0; aligned to a training set whose names
    are ``["ham", "spam"]`` it becomes class 1, as it must. A name the reference lacks, or names on one side
    and plain integers on the other, is a DataError."""
    ref = getattr(reference, "label_names", reference)
    own = ds.label_names
    if ds.labels is None or (ref is None and own is None):
        return ds
    if ref is None or own is None:
        side = "names" if own is not None else "integers"
        raise DataError(f"{ds.name}: labels are {side} {own or ''} but the reference set's are "
                        f"{'names ' + str(list(ref)) if ref is not None else 'integers'}; use one kind for both "
                        "splits (or give label_names)")
    ref = [str(n) for n in ref]
    missing = [n for n in own if n not in ref]
    if missing:
        raise DataError(f"{ds.name}: label {missing[0]!r} is not a class of the reference set {ref}; fix the "
                        "label or list every class in label_names")
    remap = np.array([ref.index(n) for n in own], dtype=np.int64)
    out = ds.with_labels(remap[ds.labels])
    out.label_names = ref
    return out


def label_names_from_config(config: Any) -> list[str] | None:
    """The class names of a model config's ``id2label`` (None when absent or the default ``LABEL_i``)."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


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
