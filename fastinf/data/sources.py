"""Opening Arrow-shaped sources as an ``ArrowTextDataset``: what each kind of source is and how it is read.

* ``pyarrow.Table`` / ``RecordBatch``: read in place.
* ``datasets.Dataset``: its Arrow table (``.data``, memory-mapped from the cache for a loaded or
  ``load_from_disk`` dataset), through its indices mapping after ``select``/``shuffle``; ``ClassLabel`` names kept.
* ``datasets.IterableDataset``: streamed once, batch by batch, into an Arrow file in a private temporary folder
  (removed with the dataset), then memory-mapped — it has no random access of its own.
* ``.parquet``: read by row groups (``fastinf.data.arrow_rows.ParquetRows``).
* ``.arrow`` / ``.feather`` / ``.ipc``: Arrow IPC (file or stream format), memory-mapped.
* a ``save_to_disk`` folder (``state.json``); a ``DatasetDict`` folder (``dataset_dict.json``) by its ``split``.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

from fastinf.data.arrow_rows import RowSource, ParquetRows, SelectedRows, TableRows
from fastinf.data.columns import class_label_names, label_column as pick_label_column, text_columns
from fastinf.data.layouts import resolve_column
from fastinf.data.lazy import ArrowTextDataset, arrow_ids, arrow_labels, check_text_column
from fastinf.errors import DataError

__all__ = ["ARROW_SUFFIXES", "LAZY_SUFFIXES", "is_arrow_source", "is_disk_dataset", "open_arrow_dataset",
           "arrow_rows_of"]

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
LAZY_SUFFIXES = (".parquet",) + ARROW_SUFFIXES


def is_disk_dataset(path: Path) -> bool:
    """Whether ``path`` is a ``datasets`` ``save_to_disk`` folder (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_arrow_source(data: Any) -> bool:
    """Whether ``data`` is opened lazily: an Arrow table, an HF (iterable) dataset, a Parquet/Arrow file or
    a ``save_to_disk`` folder."""
    if isinstance(data, (str, Path)):
        p = Path(data).expanduser()
        return (p.is_file() and p.suffix.lower() in LAZY_SUFFIXES) or is_disk_dataset(p)
    return _kind(data) is not None


def _kind(data: Any) -> str | None:
    mod = type(data).__module__ or ""
    if mod.startswith("pyarrow") and type(data).__name__ in ("Table", "RecordBatch"):
        return "table"
    if mod.startswith("datasets"):
        return {"Dataset": "hf", "IterableDataset": "iterable", "DatasetDict": "dict",
                "IterableDatasetDict": "dict"}.get(type(data).__name__)
    return None


def _ipc_table(path: Path) -> Any:
    """A memory-mapped Arrow IPC file (random-access file format, else stream format)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable Arrow file ({first}); check the file or convert it") from e


def _hf_rows(hf: Any) -> RowSource:
    rows: RowSource = TableRows(hf.data.table)
    indices = getattr(hf, "_indices", None)
    if indices is not None:
        rows = SelectedRows(rows, indices.column(0).to_numpy())
    return rows


def _spool_iterable(it: Any) -> RowSource:
    """Write an ``IterableDataset`` to a private Arrow file batch by batch; the folder goes with the rows."""
    import pyarrow as pa

    folder = tempfile.mkdtemp(prefix="fastinf-iterable-")
    path = Path(folder) / "rows.arrow"
    schema = it.features.arrow_schema if getattr(it, "features", None) else None
    writer = None
    try:
        for batch in it.iter(batch_size=8192):
            t = pa.Table.from_pydict(batch, schema=schema)
            schema = t.schema
            writer = writer or pa.ipc.new_file(str(path), schema)
            writer.write_table(t)
        if writer is None:
            raise DataError("the iterable dataset is empty; nothing to extract")
        writer.close()
        rows = TableRows(_ipc_table(path))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(rows, shutil.rmtree, folder, True)
    return rows


def arrow_rows_of(data: Any, split: str = "train") -> tuple[RowSource, Any, str]:
    """(rows, HF features or None, name) of an Arrow-shaped source (see the module docstring)."""
    kind = _kind(data)
    if kind == "table":
        import pyarrow as pa

        table = data if type(data).__name__ == "Table" else pa.Table.from_batches([data])
        return TableRows(table), None, "table"
    if kind == "hf":
        return _hf_rows(data), data.features, str(getattr(data.info, "dataset_name", None) or "hf")
    if kind == "iterable":
        return _spool_iterable(data), data.features, "iterable"
    if kind == "dict":
        raise DataError(f"a DatasetDict holds several splits {list(data)}; pass one, e.g. data[{split!r}]")
    path = Path(data).expanduser()
    if path.is_dir():
        return _disk_rows(path, split)
    if path.suffix.lower() == ".parquet":
        return ParquetRows(path), None, str(path)
    if path.suffix.lower() in ARROW_SUFFIXES:
        return TableRows(_ipc_table(path)), None, str(path)
    raise DataError(f"{path}: not an Arrow source; use a .parquet/.arrow file or a save_to_disk folder")


def _disk_rows(path: Path, split: str) -> tuple[RowSource, Any, str]:
    import datasets

    if (path / "dataset_dict.json").is_file():
        if not (path / split / "state.json").is_file():
            names = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise DataError(f"{path}: a DatasetDict without a split {split!r} (it has {names}); pick one with split")
        path = path / split
    try:
        hf = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"{path}: not a readable save_to_disk dataset ({type(e).__name__}: {e})") from e
    return _hf_rows(hf), hf.features, str(path)


def open_arrow_dataset(data: Any, *, text_column: Any = None, text_pair_column: Any = None,
                       label_column: Any = None, id_column: Any = None, need_labels: bool = True,
                       name: str | None = None, label_names: Sequence[str] | None = None,
                       label_threshold: float | None = None, split: str = "train") -> ArrowTextDataset:
    """``data`` (see the module docstring) as an ``ArrowTextDataset``; columns chosen as every loader does."""
    rows, features, default_name = arrow_rows_of(data, split)
    source = name or default_name    # named in errors; the dataset is named by the file name
    names = rows.column_names
    tc, pc = text_columns(names, text_column, text_pair_column, source)
    lc = pick_label_column(names, label_column, source, need_labels)
    check_text_column(rows, tc, "text", source)
    if pc is not None:
        check_text_column(rows, pc, "text pair", source)
    labels, found = None, None
    if lc is not None:
        if label_names is None:
            label_names = class_label_names(features, lc)
        labels, found = arrow_labels(rows, lc, source, label_names, label_threshold)
    ids = None if id_column is None else arrow_ids(rows, resolve_column(names, id_column, "id", source), source)
    origin = None if _kind(data) == "iterable" else data
    return ArrowTextDataset(rows, tc, pc, labels=labels, ids=ids, name=name or Path(default_name).name, label_names=found,
                            origin=origin)

