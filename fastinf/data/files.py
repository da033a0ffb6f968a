"""Local data files into columns (csv/tsv/txt, jsonl, json, parquet), and telling a path from a Hub id.

Every problem is one ``DataError`` line naming the file (and the line where there is one): a file that is
not UTF-8, a malformed JSON line, a ``.json`` that is not rows or columns, a ``.parquet`` that is not
Parquet, a CSV row with the wrong field count or a repeated column. A dataset spec that looks like a path
(a file suffix, a path separator, ``./`` / ``~``) and does not exist is "file not found", never a Hub
lookup; only names shaped like Hub ids (``name``, ``owner/name``, ``name:config``) go to the Hub.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastinf.data.layouts import PAIR_COLUMNS, TEXT_COLUMNS, detect_headerless, headerless_names
from fastinf.errors import DataError

__all__ = ["SUFFIXES", "TEXT_COLUMNS", "PAIR_COLUMNS", "read_table", "looks_like_path", "file_not_found",
           "delimited_layout"]

SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".parquet", ".arrow")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a local file rather than a Hub id (``imdb``, ``owner/name``, ``glue:sst2``)."""
    s = spec.strip()
    if not s or s.startswith((".", "/", "~")) or "\\" in s or s.endswith("/") or s.count("/") > 1:
        return True
    name = s.split(":", 1)[0]           # "cnn_dailymail:3.0.0": the config may hold dots
    return bool(Path(name).suffix)


def file_not_found(spec: str) -> DataError:
    """The error for a path-like ``spec`` that does not exist, with near matches from its folder."""
    p = Path(spec).expanduser()
    hint = ""
    parent = p.parent if str(p.parent) else Path(".")
    if parent.is_dir():
        try:
            names = [c.name for c in parent.iterdir()]
        except OSError:
            names = []
        near = difflib.get_close_matches(p.name, names, n=3)
        if near:
            hint = f" (did you mean {' or '.join(repr(str(parent / n)) for n in near)}?)"
    elif str(parent) not in ("", "."):
        hint = f" (its folder {str(parent)!r} does not exist either)"
    return DataError(f"data file {spec!r}: file not found{hint}. Give an existing {'/'.join(SUFFIXES)} file or "
                     "folder, 'sms', or a Hub dataset id such as 'owner/name' or 'glue:sst2'.")


def _decode(path: Path) -> str:
    """The file's text (UTF-8, a BOM dropped); a non-UTF-8 byte is named with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "re-save the file as UTF-8") from e


def _delimited_rows(path: Path, suffix: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty row of a .csv/.tsv/.txt (TSV: quoting off, as GLUE)."""
    delim = "," if suffix == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delim, quoting=quoting)
    rows = []
    try:
        for row in reader:
            if row:
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not readable as {suffix[1:].upper()} ({e})") from e
    if not rows:
        raise DataError(f"{path} is empty; expected a header line and one row per sample")
    return rows


def _header_and_data(path: Path, rows: list[tuple[int, list[str]]], header: bool | None,
                     columns: Sequence[str] | None) -> tuple[list[str], list[tuple[int, list[str]]], str]:
    """Column names, data rows and how the names were found ("header", "columns", "layout <name>")."""
    if columns is not None and header:
        raise DataError(f"{path}: columns names the columns of a headerless file; with header: true pick "
                        "columns with text_column / label_column instead")
    if header is None and columns is None:
        found = detect_headerless([r for _, r in rows[:20]])
        if found is not None:
            return list(found[1]), rows, f"layout {found[0]}"
    if header is False or columns is not None:
        return headerless_names(columns, len(rows[0][1]), str(path)), rows, "columns"
    names = [h.strip() for h in rows[0][1]]
    dup = sorted({h for h in names if names.count(h) > 1})
    if dup:
        raise DataError(f"{path}:1: column {dup[0]!r} appears more than once in the header; rename it")
    return names, rows[1:], "header"


def delimited_layout(path: Path, header: bool | None = None, columns: Sequence[str] | None = None
                     ) -> tuple[list[str], list[list[str]], bool]:
    """(column names, data rows as fields, whether the file has a header line) of a .csv/.tsv/.txt, found as
    the loader finds them (``write_like`` writes a file back in the same layout)."""
    suffix = path.suffix.lower()
    names, data, how = _header_and_data(path, _delimited_rows(path, suffix), header, columns)
    bad = next(((line, row) for line, row in data if len(row) != len(names)), None)
    if bad is not None:
        what = "header has" if how == "header" else f"{how} names"
        raise DataError(f"{path}:{bad[0]}: {len(bad[1])} fields, {what} {len(names)}")
    return names, [row for _, row in data], how == "header"


def _read_delimited(path: Path, suffix: str, header: bool | None = None,
                    columns: Sequence[str] | None = None) -> dict[str, list[Any]]:
    names, data, how = _header_and_data(path, _delimited_rows(path, suffix), header, columns)
    cols: dict[str, list[Any]] = {h: [] for h in names}
    texts = set(TEXT_COLUMNS + PAIR_COLUMNS)
    for line, row in data:
        if len(row) != len(names):
            what = "header has" if how == "header" else f"{how} names"
            raise DataError(f"{path}:{line}: {len(row)} fields, {what} {len(names)}")
        for h, v in zip(names, row):
            cols[h].append(v.strip() if h not in texts else v.rstrip(" "))
    return cols


def _rows_to_columns(rows: list[Any], path: Path, where: str) -> dict[str, list[Any]]:
    """Columns of a list of row objects (keys: the union over rows, in first-seen order)."""
    keys: dict[str, None] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{path}: {where.format(i=i + 1)} is a {type(r).__name__}, not an object; a "
                            ".jsonl needs one JSON object per line and a .json a list of objects or an object "
                            "of column lists")
        keys.update(dict.fromkeys(r))
    return {k: [r.get(k) for r in rows] for k in keys}


def _read_jsonl(path: Path) -> dict[str, list[Any]]:
    rows = []
    for lineno, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            "one JSON object") from e
        if not isinstance(rows[-1], dict):
            raise DataError(f"{path}:{lineno}: a {type(rows[-1]).__name__}, not a JSON object; each line must "
                            "be one JSON object such as {\"text\": ..., \"label\": ...}")
    return _rows_to_columns(rows, path, "line {i}")


def _read_json(path: Path) -> dict[str, list[Any]]:
    try:
        obj = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(obj, dict):
        bad = [k for k, v in obj.items() if not isinstance(v, list)]
        if bad:
            raise DataError(f"{path}: column {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a list; a .json "
                            "object must map each column name to a list of values")
        return {k: list(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return _rows_to_columns(obj, path, "item {i}")
    raise DataError(f"{path}: a .json data file must hold a list of row objects or an object of column lists, "
                    f"not a {type(obj).__name__}")


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        return pq.read_table(path).to_pydict()
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable Parquet file ({first}); check the file or convert it") from e


def read_table(path: Path, header: bool | None = None, columns: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Column name -> values of a local data file, chosen by its suffix.

    ``header`` / ``columns`` apply to .csv/.tsv/.txt (see ``fastinf.data.layouts``): None detects GLUE's
    known headerless layouts, False reads the first line as data (names from ``columns`` or "0", "1", ...)."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv", ".txt"):
        return _read_delimited(path, suffix, header, columns)
    if header is not None or columns is not None:
        raise DataError(f"{path}: header / columns apply to .csv and .tsv files; a {suffix} file names its "
                        "columns itself")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")
