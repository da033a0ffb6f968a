"""Choosing the text, pair, label and id columns of a table — one rule for every source.

The eager loaders (``fastinf.data.datasets``: csv/tsv/jsonl/json, dicts, row lists) and the lazy Arrow-backed
ones (``fastinf.data.lazy``: Parquet, Arrow, HF datasets, pyarrow tables) both pick columns here, so that a
file gives the same columns, labels and ids whichever way it is read:

* given names (or indices) win; else a known pair layout (``fastinf.data.layouts.PAIR_LAYOUTS``); else the first
  known text column, then a known pair column;
* the label column is given or the first of ``LABEL_COLUMNS`` (required unless the task needs no labels);
* ids come from ``id_column`` when given (integers, no repeats), else 0..N-1 (never guessed from an ``idx``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastinf.data.layouts import LABEL_COLUMNS, PAIR_COLUMNS, TEXT_COLUMNS, pick_pair, resolve_column
from fastinf.errors import DataError

__all__ = ["pick_column", "text_columns", "label_column", "class_label_names", "checked_ids"]


def pick_column(columns: Sequence[str], wanted: Any, candidates: Sequence[str], what: str,
                source: str, required: bool) -> str | None:
    """``wanted`` resolved against ``columns``, else the first candidate present (or an error when required)."""
    if wanted is not None:
        return resolve_column(columns, wanted, what, source)
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise DataError(f"{source}: no {what} column found (looked for {list(candidates)}); columns are "
                        f"{list(columns)} - name it with --{what.replace(' ', '-')}-column (a file without a "
                        "header line: header: false and columns: [...])")
    return None


def text_columns(names: Sequence[str], text_column: Any, text_pair_column: Any,
                 source: str) -> tuple[str, str | None]:
    """The text and pair columns: given ones, else a known pair layout, else the first text column."""
    if text_column is None and text_pair_column is None:
        pair = pick_pair(names)
        if pair is not None:
            return pair
    tc = pick_column(names, text_column, TEXT_COLUMNS, "text", source, True)
    pc = pick_column(names, text_pair_column, [c for c in PAIR_COLUMNS if c != tc], "text pair", source, False)
    return tc, pc


def label_column(names: Sequence[str], wanted: Any, source: str, required: bool) -> str | None:
    """The label column: ``wanted``, else the first known label column (required when labels are needed)."""
    return pick_column(names, wanted, LABEL_COLUMNS, "label", source, required)


def class_label_names(features: Any, label_col: Any) -> list[str] | None:
    """The names of an HF ``ClassLabel`` label column (None for other features or none at all)."""
    features = features or {}
    col = label_col if isinstance(label_col, str) else next((c for c in LABEL_COLUMNS if c in features), None)
    names = getattr(features.get(col), "names", None) if col is not None else None
    return list(names) if names else None


def checked_ids(values: Any, n: int, column: str, source: str) -> np.ndarray:
    """The sample ids of ``column``: ``n`` integers (int64), none missing, none repeated."""
    arr = np.asarray(values) if isinstance(values, np.ndarray) else np.array(list(values), dtype=object)
    if arr.dtype == object:
        arr = _integers(arr)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.floor(arr)).all():
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu" or arr.shape != (n,):
        raise DataError(f"{source}: id column {column!r} must hold one integer per row (got "
                        f"{arr.dtype if arr.dtype != object else 'mixed/missing'} values); pick another "
                        "id_column or leave it unset (ids 0..N-1)")
    out = arr.astype(np.int64)
    if np.unique(out).size != n:
        raise DataError(f"{source}: id column {column!r} repeats ids; ids must be unique - pick another "
                        "id_column or leave it unset (ids 0..N-1)")
    return out


def _integers(values: np.ndarray) -> np.ndarray:
    """Object values as int64 when every one is an integer or a string of one (a CSV column), else as is."""
    out = np.empty(values.shape, dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, str)):
            return values
        try:
            out[i] = int(v.strip()) if isinstance(v, str) else int(v)
        except (ValueError, OverflowError):
            return values
    return out
