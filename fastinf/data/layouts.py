"""Column layouts of GLUE-like files: headerless files, known headerless layouts, pair columns.

* ``header: false`` (+ ``columns: [names]``) reads a delimited file whose first line is data; without
  names the columns are called ``"0"``, ``"1"``, ... and ``text_column`` / ``label_column`` may be indices.
* Known headerless layouts are detected when ``header`` is not given: GLUE's CoLA train/dev files
  (``source, label, mark, sentence``: e.g. ``gj04\\t1\\t\\tOur friends won't buy this analysis.``). A first line
  that names a known column (``sentence``, ``label``, ...) is always a header.
* Pair columns: when neither ``text_column`` nor ``text_pair_column`` is given and a file holds both columns
  of a known pair (``question``/``sentence`` (QNLI), ``question1``/``question2`` (QQP),
  ``sentence1``/``sentence2`` (MRPC, RTE, WNLI), ``premise``/``hypothesis`` (MNLI on the Hub), ...), both
  are used — a pair file never silently loses its first text.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastinf.errors import DataError

__all__ = ["TEXT_COLUMNS", "PAIR_COLUMNS", "LABEL_COLUMNS", "PAIR_LAYOUTS", "HEADERLESS_LAYOUTS",
           "detect_headerless", "headerless_names", "pick_pair", "resolve_column"]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "premise", "#1 String", "content",
                "document")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "hypothesis", "#2 String")
LABEL_COLUMNS = ("label", "labels", "Quality", "is_duplicate", "gold_label", "score")
# (first text, second text), most specific first
PAIR_LAYOUTS = (("question", "sentence"), ("question1", "question2"), ("sentence1", "sentence2"),
                ("premise", "hypothesis"), ("#1 String", "#2 String"), ("text", "text_pair"))
_KNOWN = frozenset(TEXT_COLUMNS + PAIR_COLUMNS + LABEL_COLUMNS + ("index", "idx", "id", "#1 ID", "#2 ID"))

# name -> (column names, one regex per field that every sampled data row matches)
HEADERLESS_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cola": (("source", "label", "mark", "sentence"), (r"[A-Za-z][A-Za-z0-9_]*", r"[01]", r"\**\?*", r".*\S.*")),
}
_SAMPLE_ROWS = 20


def _matches(layout: tuple[tuple[str, ...], tuple[str, ...]], rows: Sequence[Sequence[str]]) -> bool:
    names, patterns = layout
    return bool(rows) and all(len(r) == len(names) and all(re.fullmatch(p, f.strip()) for p, f in zip(patterns, r))
                              for r in rows)


def detect_headerless(rows: Sequence[Sequence[str]]) -> tuple[str, tuple[str, ...]] | None:
    """The known headerless layout the first rows of a file follow (name, column names), or None.

    A first row holding a known column name is a header, never data."""
    if not rows or any(f.strip() in _KNOWN for f in rows[0]):
        return None
    sample = [r for r in rows[:_SAMPLE_ROWS] if r]
    for name, layout in HEADERLESS_LAYOUTS.items():
        if _matches(layout, sample):
            return name, layout[0]
    return None


def headerless_names(columns: Sequence[str] | None, n_fields: int, source: str) -> list[str]:
    """Column names of a ``header: false`` file: ``columns`` (one per field), or ``"0"``, ``"1"``, ..."""
    if columns is None:
        return [str(i) for i in range(n_fields)]
    names = [str(c) for c in columns]
    if len(names) != n_fields:
        raise DataError(f"{source}: columns names {len(names)} column(s) {names} but the first line has "
                        f"{n_fields} field(s); give one name per field")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{source}: column {dup[0]!r} appears more than once in columns; rename it")
    return names


def resolve_column(columns: Sequence[str], wanted: Any, what: str, source: str) -> str:
    """``wanted`` (a name, or an integer index into the file's columns) as a column name."""
    if isinstance(wanted, bool):
        raise DataError(f"{source}: {what} column must be a name or an index, not {wanted!r}")
    if isinstance(wanted, int) or (isinstance(wanted, str) and wanted.isdigit() and wanted not in columns):
        i = int(wanted)
        if not 0 <= i < len(columns):
            raise DataError(f"{source}: {what} column index {i} is out of range; the file has {len(columns)} "
                            f"columns {list(columns)}")
        return columns[i]
    if wanted not in columns:
        raise DataError(f"{source}: no {what} column {wanted!r}; columns are {list(columns)}")
    return str(wanted)


def pick_pair(columns: Sequence[str]) -> tuple[str, str] | None:
    """The first known (text, pair) layout whose two columns the file holds, or None."""
    have = set(columns)
    return next(((a, b) for a, b in PAIR_LAYOUTS if a in have and b in have), None)
