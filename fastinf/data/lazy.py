"""``ArrowTextDataset``: the ``TextDataset`` interface over Arrow data that is never turned into Python lists.

Only labels and ids live in memory (numpy, 8 bytes a row each); texts stay in Arrow (a memory-mapped file, a
Parquet file read by row groups, an HF dataset's cache, an in-memory ``pyarrow.Table``) and become Python
strings only for the rows a caller asks for: ``text_range(a, b)`` / ``text_batch(rows)`` return small lists,
``texts`` / ``text_pairs`` are lazy sequences (an int, a slice or an index array gives the same values as the
eager list would). ``fingerprint()`` streams and equals ``TextDataset.fingerprint()`` of the same rows, so a
store extracted from a Parquet file matches the one extracted from the same rows as a list.

Checks match ``TextDataset``: a missing text is refused at open (Arrow null counts, no pass over a Parquet
file that records them), labels go through ``fastinf.data.labels.labels_to_int`` (on the distinct values,
then on every row only to name the rows of an error).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fastinf.data.arrow_rows import BATCH_ROWS, RowSource
from fastinf.data.columns import checked_ids
from fastinf.data.labels import checked_labels, checked_texts, labels_to_int
from fastinf.errors import DataError

__all__ = ["ArrowTextDataset", "LazyTexts", "arrow_labels", "arrow_ids", "check_text_column"]


def _is_string(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                            lambda _: False)(t)


def _as_texts(arr: Any, what: str, source: str) -> list[str]:
    """An Arrow array of one batch as Python strings (non-string columns as ``TextDataset`` converts them)."""
    values = arr.to_pylist()
    return values if _is_string(arr.type) else checked_texts(values, what, source)


def check_text_column(rows: RowSource, column: str, what: str, source: str) -> None:
    """Refuse missing texts (and, for a non-string column, anything ``TextDataset`` refuses) - same message."""
    if not _is_string(rows.schema.field(column).type):
        checked_texts([v for t in rows.batches([column]) for v in t.column(0).to_pylist()], what, source)
    elif rows.null_count(column):
        mask = [v is None for t in rows.batches([column]) for v in t.column(0).to_pylist()]
        checked_texts([None if m else "" for m in mask], what, source)   # raises, naming the rows


def _whole(rows: RowSource, column: str) -> Any:
    import pyarrow as pa

    parts = [c for t in rows.batches([column]) for c in t.column(0).chunks]
    return pa.chunked_array(parts, type=rows.schema.field(column).type)


def arrow_labels(rows: RowSource, column: str, source: str, label_names: Sequence[str] | None = None,
                 label_threshold: float | None = None) -> tuple[np.ndarray, list[str] | None]:
    """Integer classes of a label column, exactly as ``labels_to_int`` of its values gives them.

    The rule runs on the distinct values (cheap for millions of rows); an error is re-raised from every
    value so that it names the rows, as the eager loaders do."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _whole(rows, column)
    try:
        uniques = pc.unique(col)
        codes, names = labels_to_int(uniques.to_pylist(), source, label_names=label_names,
                                     label_threshold=label_threshold)
        where = pc.index_in(col, value_set=uniques).to_numpy(zero_copy_only=False)
        return codes[where.astype(np.int64)], names
    except (DataError, pa.ArrowException, TypeError, ValueError):
        return labels_to_int(col.to_pylist(), source, label_names=label_names, label_threshold=label_threshold)


def arrow_ids(rows: RowSource, column: str, source: str) -> np.ndarray:
    """The ids of ``column``: unique integers, none missing (``fastinf.data.columns.checked_ids``)."""
    import pyarrow as pa

    col = _whole(rows, column)
    if pa.types.is_integer(col.type) and col.null_count == 0:
        return checked_ids(col.to_numpy(), rows.num_rows, column, source)
    return checked_ids(np.array(col.to_pylist(), dtype=object), rows.num_rows, column, source)


class LazyTexts(Sequence):
    """The texts of one column as a read-only sequence; nothing is read until indexed or iterated."""

    def __init__(self, rows: RowSource, column: str, what: str, source: str) -> None:
        self._rows, self._column, self._what, self._source = rows, column, what, source

    def __len__(self) -> int:
        return self._rows.num_rows

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step == 1:
                return self._list(self._rows.read([self._column], a, max(a, b)))
            key = np.arange(a, b, step)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"text {int(key)} out of range for {len(self)} rows")
            return self._list(self._rows.read([self._column], i, i + 1))[0]
        return self._list(self._rows.take([self._column], np.asarray(key, dtype=np.int64)))

    def __iter__(self) -> Iterator[str]:
        for t in self._rows.batches([self._column]):
            yield from self._list(t)

    def _list(self, table: Any) -> list[str]:
        return _as_texts(table.column(0), self._what, self._source)

    def __repr__(self) -> str:
        return f"LazyTexts({self._column!r}, {len(self)} rows)"


class ArrowTextDataset:
    """Texts (and pairs) in Arrow, labels and ids in numpy: the interface ``TextDataset`` gives extraction.

    Build one with ``fastinf.data.as_text_dataset`` / ``load_dataset_spec`` / ``open_arrow_dataset``; the
    constructor takes checked parts. ``origin`` is the source it was opened from (a path or an object) when
    the rows are all of it, in order (``write_like`` accepts the dataset then); None for a subset.
    """

    def __init__(self, rows: RowSource, text_column: str, text_pair_column: str | None = None, *,
                 labels: np.ndarray | None = None, ids: np.ndarray | None = None, name: str = "dataset",
                 label_names: Sequence[str] | None = None, origin: Any = None) -> None:
        n = rows.num_rows
        self.rows, self.text_column, self.text_pair_column = rows, text_column, text_pair_column
        self.labels = None if labels is None else checked_labels(labels, n, name)
        self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if self.ids.shape != (n,):
            raise DataError(f"{name}: {self.ids.shape[0]} ids for {n} rows")
        self.name, self.origin = name, origin
        self.label_names = None if label_names is None else list(label_names)
        self.extra: dict[str, Any] = {}
        self._text_hash: Any = None

    def __len__(self) -> int:
        return self.rows.num_rows

    def __repr__(self) -> str:
        pair = f", pair={self.text_pair_column!r}" if self.text_pair_column else ""
        return f"ArrowTextDataset({self.name!r}, {len(self)} rows, text={self.text_column!r}{pair})"

    @property
    def num_classes(self) -> int | None:
        if self.labels is None or len(self.labels) == 0:
            return None
        return int(self.labels.max()) + 1

    @property
    def column_names(self) -> list[str]:
        return self.rows.column_names

    @property
    def texts(self) -> LazyTexts:
        return LazyTexts(self.rows, self.text_column, "text", self.name)

    @property
    def text_pairs(self) -> LazyTexts | None:
        if self.text_pair_column is None:
            return None
        return LazyTexts(self.rows, self.text_pair_column, "text pair", self.name)

    def _cols(self) -> list[str]:
        return [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])

    def _split(self, table: Any) -> tuple[list[str], list[str] | None]:
        texts = _as_texts(table.column(0), "text", self.name)
        pairs = _as_texts(table.column(1), "text pair", self.name) if self.text_pair_column else None
        return texts, pairs

    def text_range(self, a: int, b: int) -> tuple[list[str], list[str] | None]:
        """Texts and pairs (None without a pair column) of rows ``a..b-1``: lists of ``b - a`` strings."""
        return self._split(self.rows.read(self._cols(), a, b))

    def text_batch(self, rows: Sequence[int] | np.ndarray) -> tuple[list[str], list[str] | None]:
        """Texts and pairs of the rows ``rows`` (in that order)."""
        return self._split(self.rows.take(self._cols(), np.asarray(rows, dtype=np.int64)))

    def table(self, a: int = 0, b: int | None = None, columns: Sequence[str] | None = None) -> Any:
        """Rows ``a..b-1`` of ``columns`` (default: all) as a ``pyarrow.Table``."""
        return self.rows.read(list(columns or self.column_names), a, len(self) if b is None else b)

    def subset(self, idx: Sequence[int] | np.ndarray, name: str | None = None) -> "ArrowTextDataset":
        """Rows ``idx`` (keeping their original ids); nothing is read."""
        idx = np.asarray(idx, dtype=np.int64)
        return ArrowTextDataset(self.rows.select(idx), self.text_column, self.text_pair_column,
                                labels=None if self.labels is None else self.labels[idx], ids=self.ids[idx],
                                name=name or self.name, label_names=self.label_names)

    def with_labels(self, labels: np.ndarray) -> "ArrowTextDataset":
        """The same texts with other labels (e.g. after noise injection)."""
        out = ArrowTextDataset(self.rows, self.text_column, self.text_pair_column, labels=np.asarray(labels),
                               ids=self.ids, name=self.name, label_names=self.label_names, origin=self.origin)
        out._text_hash = self._text_hash     # same rows, same texts: hashed once
        return out

    def fingerprint(self) -> str:
        """Hash of texts, pairs, labels and ids, streamed; equal to ``TextDataset.fingerprint`` of the rows.

        The texts' part is hashed once per dataset object; labels and ids are hashed on every call."""
        if self._text_hash is None:
            h = hashlib.sha256()
            for a in range(0, len(self), BATCH_ROWS):
                texts, pairs = self.text_range(a, min(a + BATCH_ROWS, len(self)))
                pairs = pairs if pairs is not None else [""] * len(texts)
                h.update("".join(f"{t}\x1f{p}\x1e" for t, p in zip(texts, pairs)).encode("utf-8", "surrogatepass"))
            self._text_hash = h
        h = self._text_hash.copy()
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(np.ascontiguousarray(self.ids).tobytes())
        return h.hexdigest()[:32]
