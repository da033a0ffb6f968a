"""Writing kept rows (plus extra columns) of Arrow batches: Parquet, Arrow IPC, jsonl/csv/tsv rows, ``save_to_disk``.

Used by ``fastinf.data.tables.write_like``. Input is a stream of ``pyarrow.Table`` batches in row order (never the
whole table at once for Parquet/Arrow sources); ``Extras`` holds the extra columns over the kept rows and hands
each batch its slice. Every untouched column keeps its values, type and order; HF feature metadata (``ClassLabel``
names) is carried over, with the extra columns added to it.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import DataError

__all__ = ["Extras", "kept_batches", "write_parquet", "write_ipc", "write_rows", "write_hf_disk", "schema_plus"]


class Extras:
    """Extra columns over the kept rows, as Arrow arrays, handed out batch by batch in row order."""

    def __init__(self, columns: dict[str, Any], n_kept: int) -> None:
        import pyarrow as pa

        self.arrays = {name: pa.array(np.asarray(v) if isinstance(v, np.ndarray) else list(v))
                       for name, v in columns.items()}
        self.n_kept, self.offset = n_kept, 0

    @property
    def fields(self) -> list[Any]:
        import pyarrow as pa

        return [pa.field(name, arr.type) for name, arr in self.arrays.items()]

    def add_to(self, table: Any) -> Any:
        """``table`` (the next kept rows) with the extra columns' next values appended."""
        k = table.num_rows
        for name, arr in self.arrays.items():
            table = table.append_column(name, arr.slice(self.offset, k))
        self.offset += k
        return table


def kept_batches(batches: Iterator[Any], keep: np.ndarray, extras: Extras) -> Iterator[Any]:
    """The kept rows of each batch with the extra columns appended; checks the row count at the end."""
    a = 0
    for t in batches:
        mask = keep[a:a + t.num_rows]
        if mask.size != t.num_rows:
            raise DataError(f"the source has more than the {keep.size} rows keep covers; pass one entry per row")
        a += t.num_rows
        yield extras.add_to(t.filter(mask) if not mask.all() else t)
    if a != keep.size:
        raise DataError(f"the source has {a} rows but keep has {keep.size}; pass one entry per row")


def schema_plus(schema: Any, extras: Extras) -> Any:
    """``schema`` with the extra fields; HF feature metadata updated to list them (or dropped if unreadable)."""
    out = schema
    for f in extras.fields:
        out = out.append(f)
    meta = dict(schema.metadata or {})
    if b"huggingface" in meta and extras.arrays:
        try:
            import datasets
            import pyarrow as pa

            info = json.loads(meta[b"huggingface"])
            added = datasets.Features.from_arrow_schema(pa.schema(extras.fields)).to_dict()
            info["info"]["features"].update(added)
            meta[b"huggingface"] = json.dumps(info).encode()
        except (KeyError, TypeError, ValueError, ImportError):
            meta.pop(b"huggingface")
    return out.with_metadata(meta) if meta else out.remove_metadata()


def write_parquet(tmp: Path, schema: Any, batches: Iterator[Any]) -> None:
    import pyarrow.parquet as pq

    with pq.ParquetWriter(str(tmp), schema) as w:
        for t in batches:
            w.write_table(t.cast(schema))


def write_ipc(tmp: Path, schema: Any, batches: Iterator[Any], stream: bool = False) -> None:
    import pyarrow as pa

    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with opener(str(tmp), schema) as w:
        for t in batches:
            w.write_table(t.cast(schema))


def _cell(v: Any, tsv: bool, column: str) -> str:
    s = "" if v is None else v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    if tsv and ("\t" in s or "\n" in s or "\r" in s):
        raise DataError(f"column {column!r} holds a tab or line break, which a .tsv cannot store; write .csv, "
                        ".jsonl or .parquet instead")
    return s


def write_rows(tmp: Path, fmt: str, names: list[str], batches: Iterator[Any]) -> None:
    """Rows as .jsonl (one object a line) or .csv/.tsv (a header line, then one line a row)."""
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        if fmt == "csv":
            w.writerow(names)
        elif fmt == "tsv":
            f.write("\t".join(names) + "\n")
        for t in batches:
            for row in t.to_pylist():
                if fmt == "jsonl":
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                elif fmt == "csv":
                    w.writerow([_cell(row[c], False, c) for c in names])
                else:
                    f.write("\t".join(_cell(row[c], True, c) for c in names) + "\n")


def write_hf_disk(tmp: Path, hf: Any, keep: np.ndarray, extras: Extras, schema: Any = None,
                  batches: Iterator[Any] | None = None) -> None:
    """A ``save_to_disk`` folder at ``tmp``: ``hf.select(kept)`` (+ extras), or the batches spooled through a
    private Arrow stream file next to ``tmp`` (removed after)."""
    import datasets

    spool = None
    try:
        if hf is None:
            spool = tmp.with_name(tmp.name + ".spool.arrow")
            write_ipc(spool, schema, batches, stream=True)
            ds = datasets.Dataset.from_file(str(spool), in_memory=False)
        else:
            ds = hf.select(np.flatnonzero(keep)) if not keep.all() else hf
            for name, arr in extras.arrays.items():
                ds = ds.add_column(name, arr.to_pylist())
        ds.save_to_disk(str(tmp))
    finally:
        if spool is not None:
            spool.unlink(missing_ok=True)
