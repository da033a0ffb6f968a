"""Row access to Arrow data without reading it all: ranges, index arrays and batches of chosen columns.

``RowSource`` is what ``fastinf.data.lazy.ArrowTextDataset`` reads through. Three kinds:

* ``TableRows`` — a ``pyarrow.Table`` (in memory, or memory-mapped from an Arrow file / an HF dataset's cache
  files): slices are zero-copy, ``take`` copies only the rows asked for.
* ``ParquetRows`` — a Parquet file read one row group at a time (only the columns asked for); the last two
  decoded row groups are cached, so a chunk's range read followed by its batches' index reads decodes each
  row group once. Memory is bounded by two row groups of the text columns, whatever the file's size.
* ``SelectedRows`` — rows ``indices`` of another source (a subset; HF datasets' indices mappings).
"""
from __future__ import annotations

import abc

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import DataError

__all__ = ["RowSource", "TableRows", "ParquetRows", "SelectedRows", "BATCH_ROWS"]

BATCH_ROWS = 8192   # rows per streamed batch (fingerprint, label/id columns, write-back)


class RowSource(abc.ABC):
    """Rows of a table: ``read(columns, a, b)``, ``take(columns, rows)``, ``batches(columns)`` (subclasses give
    the first two; the rest is built on them)."""

    num_rows: int
    schema: Any

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    @abc.abstractmethod
    def read(self, columns: Sequence[str], a: int, b: int) -> Any:
        """Rows ``a..b-1`` of ``columns`` as a ``pyarrow.Table``."""

    @abc.abstractmethod
    def take(self, columns: Sequence[str], rows: np.ndarray) -> Any:
        """Rows ``rows`` (any order, repeats allowed) of ``columns`` as a ``pyarrow.Table``."""

    def batches(self, columns: Sequence[str], size: int = BATCH_ROWS) -> Iterator[Any]:
        """All rows of ``columns``, in order, as tables of at most ``size`` rows."""
        for a in range(0, self.num_rows, size):
            yield self.read(columns, a, min(a + size, self.num_rows))

    def null_count(self, column: str) -> int:
        """Missing values in ``column`` (streamed)."""
        return sum(t.column(0).null_count for t in self.batches([column]))

    def select(self, rows: np.ndarray) -> "RowSource":
        """The rows ``rows`` of this source (a subset, in that order)."""
        return SelectedRows(self, np.asarray(rows, dtype=np.int64))


def _check_range(n: int, a: int, b: int) -> None:
    if not 0 <= a <= b <= n:
        raise IndexError(f"rows {a}..{b} out of range for {n} rows")


def _check_rows(n: int, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row {int(rows[(rows < 0) | (rows >= n)][0])} out of range for {n} rows")
    return rows


class TableRows(RowSource):
    """A ``pyarrow.Table`` (zero-copy slices)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.num_rows = table.num_rows
        self.schema = table.schema

    def read(self, columns: Sequence[str], a: int, b: int) -> Any:
        _check_range(self.num_rows, a, b)
        return self.table.select(list(columns)).slice(a, b - a)

    def take(self, columns: Sequence[str], rows: np.ndarray) -> Any:
        return self.table.select(list(columns)).take(_check_rows(self.num_rows, rows))

    def null_count(self, column: str) -> int:
        return self.table.column(column).null_count


class ParquetRows(RowSource):
    """A Parquet file read by row groups (two decoded row groups cached, per column set)."""

    CACHE = 2

    def __init__(self, path: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self.file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: not a readable Parquet file ({first}); check the file or convert it") from e
        meta = self.file.metadata
        self.num_rows = meta.num_rows
        self.schema = self.file.schema_arrow
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    def _group(self, g: int, columns: Sequence[str]) -> Any:
        key = (g, tuple(columns))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self.file.read_row_group(g, columns=list(columns))
        self._cache[key] = table
        while len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return table

    def read(self, columns: Sequence[str], a: int, b: int) -> Any:
        import pyarrow as pa

        _check_range(self.num_rows, a, b)
        if a == b:
            return self.schema.empty_table().select(list(columns))
        g0 = int(np.searchsorted(self.starts, a, side="right")) - 1
        g1 = int(np.searchsorted(self.starts, b - 1, side="right")) - 1
        parts = []
        for g in range(g0, g1 + 1):
            s = int(self.starts[g])
            lo, hi = max(a, s) - s, min(b, int(self.starts[g + 1])) - s
            parts.append(self._group(g, columns).slice(lo, hi - lo))
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def take(self, columns: Sequence[str], rows: np.ndarray) -> Any:
        import pyarrow as pa

        rows = _check_rows(self.num_rows, rows)
        if rows.size == 0:
            return self.schema.empty_table().select(list(columns))
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(groups, kind="stable")
        parts = []
        for g in np.unique(groups):
            local = rows[order[groups[order] == g]] - self.starts[g]
            parts.append(self._group(int(g), columns).take(local))
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return table.take(np.argsort(order, kind="stable"))

    def batches(self, columns: Sequence[str], size: int = BATCH_ROWS) -> Iterator[Any]:
        import pyarrow as pa

        for rb in self.file.iter_batches(batch_size=size, columns=list(columns)):
            yield pa.Table.from_batches([rb])

    def null_count(self, column: str) -> int:
        i = self.schema.names.index(column)
        meta, total = self.file.metadata, 0
        for g in range(meta.num_row_groups):
            leaf = _leaf_index(self.file, i)
            st = meta.row_group(g).column(leaf).statistics if leaf is not None else None
            if st is None or not st.has_null_count:
                return super().null_count(column)
            total += st.null_count
        return total


def _leaf_index(file: Any, field_index: int) -> int | None:
    """The Parquet leaf column of a top-level Arrow field (None for a nested field)."""
    name = file.schema_arrow.names[field_index]
    paths = [file.schema.column(j).path for j in range(len(file.schema))]
    hits = [j for j, p in enumerate(paths) if p == name]
    return hits[0] if len(hits) == 1 else None


class SelectedRows(RowSource):
    """Rows ``indices`` of ``base``; a contiguous run of indices is read as a range."""

    def __init__(self, base: RowSource, indices: np.ndarray) -> None:
        self.base = base
        self.indices = _check_rows(base.num_rows, indices)
        self.num_rows = int(self.indices.size)
        self.schema = base.schema

    def read(self, columns: Sequence[str], a: int, b: int) -> Any:
        _check_range(self.num_rows, a, b)
        idx = self.indices[a:b]
        if idx.size and idx[-1] - idx[0] == idx.size - 1 and (idx.size < 2 or (np.diff(idx) == 1).all()):
            return self.base.read(columns, int(idx[0]), int(idx[-1]) + 1)
        return self.base.take(columns, idx)

    def take(self, columns: Sequence[str], rows: np.ndarray) -> Any:
        return self.base.take(columns, self.indices[_check_rows(self.num_rows, rows)])

    def select(self, rows: np.ndarray) -> RowSource:
        return SelectedRows(self.base, self.indices[_check_rows(self.num_rows, rows)])
