"""Writing a text data file back in its own format, kept rows only, extra columns appended.

* ``.jsonl``: streamed line by line; a kept line without extras is copied byte for byte (key order, number
  formatting, unicode escapes all kept); with extras the object gets the new keys at its end. Blank lines
  are not rows (as the loader reads them) and are dropped.
* ``.csv`` / ``.tsv``: the layout the loader finds (header line or headerless, ``fastinf.data.files``); fields
  are written back as read (TSV with quoting off, as GLUE; CSV quoted where needed), a BOM kept.
* ``.json``: a list of row objects or an object of column lists, the same shape back.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.data.files import delimited_layout
from fastinf.data.write_arrow import Extras, _cell
from fastinf.errors import DataError

__all__ = ["TEXT_FORMATS", "count_rows", "write_same_text"]

TEXT_FORMATS = ("jsonl", "csv", "tsv", "json")


def _extra_rows(extras: Extras, k: int) -> list[dict[str, Any]]:
    """The next ``k`` kept rows' extra values, as Python objects."""
    cols = {name: arr.slice(extras.offset, k).to_pylist() for name, arr in extras.arrays.items()}
    extras.offset += k
    return [{name: cols[name][i] for name in cols} for i in range(k)]


def _check_count(path: Path, n: int, keep: np.ndarray) -> None:
    if n != keep.size:
        raise DataError(f"{path} has {n} rows but keep has {keep.size}; pass one entry per row")


def _jsonl(src: Path, tmp: Path, keep: np.ndarray, extras: Extras) -> None:
    n = 0
    with open(src, "rb") as f, open(tmp, "wb") as out:
        for raw in f:
            if not raw.strip():
                continue
            if n < keep.size and keep[n]:
                if extras.arrays:
                    obj = json.loads(raw)
                    obj.update(_extra_rows(extras, 1)[0])
                    raw = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
                elif not raw.endswith(b"\n"):
                    raw += b"\n"
                out.write(raw)
            n += 1
    _check_count(src, n, keep)


def _delimited(src: Path, tmp: Path, fmt: str, keep: np.ndarray, extras: Extras,
               header: bool | None, columns: Any) -> None:
    names, rows, has_header = delimited_layout(src, header, columns)
    _check_count(src, len(rows), keep)
    bom = src.read_bytes()[:3] == b"\xef\xbb\xbf"
    with open(tmp, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        emit = w.writerow if w else (lambda fields: f.write("\t".join(fields) + "\n"))
        if has_header:
            emit(names + list(extras.arrays))
        for row, kept in zip(rows, keep):
            if kept:
                add = _extra_rows(extras, 1)[0] if extras.arrays else {}
                emit(row + [_cell(v, fmt == "tsv", c) for c, v in add.items()])


def _json(src: Path, tmp: Path, keep: np.ndarray, extras: Extras) -> None:
    obj = json.loads(src.read_text(encoding="utf-8-sig"))
    idx = np.flatnonzero(keep)
    if isinstance(obj, dict):
        n = len(next(iter(obj.values()), []))
        _check_count(src, n, keep)
        out: Any = {k: [v[i] for i in idx] for k, v in obj.items()}
        out.update({name: arr.to_pylist() for name, arr in extras.arrays.items()})
    else:
        _check_count(src, len(obj), keep)
        out = [{**obj[i], **e} for i, e in zip(idx, _extra_rows(extras, idx.size))] if extras.arrays else \
            [obj[i] for i in idx]
    Path(tmp).write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")


def count_rows(src: Path, fmt: str, header: bool | None = None, columns: Any = None) -> int:
    """Rows of a text data file as the loader counts them (non-blank lines of a .jsonl)."""
    if fmt == "jsonl":
        with open(src, "rb") as f:
            return sum(1 for raw in f if raw.strip())
    if fmt in ("csv", "tsv"):
        return len(delimited_layout(src, header, columns)[1])
    obj = json.loads(src.read_text(encoding="utf-8-sig"))
    return len(next(iter(obj.values()), [])) if isinstance(obj, dict) else len(obj)


def write_same_text(src: Path, tmp: Path, fmt: str, keep: np.ndarray, extras: Extras,
                    header: bool | None = None, columns: Any = None) -> None:
    """Write ``src``'s kept rows (+ extras) to ``tmp`` in ``src``'s own format ``fmt``."""
    try:
        if fmt == "jsonl":
            _jsonl(src, tmp, keep, extras)
        elif fmt in ("csv", "tsv"):
            _delimited(src, tmp, fmt, keep, extras, header, columns)
        else:
            _json(src, tmp, keep, extras)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{src}: not readable as {fmt} ({type(e).__name__}: {e}); load it with "
                        "fastinf.data.as_text_dataset first to find the bad line") from e
