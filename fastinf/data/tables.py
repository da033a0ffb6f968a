"""Tabular interop: any table in as a lazy dataset, the same table back out with rows removed or annotated.

Three calls (``fastinf curate`` is built on them)::

    ds = fastinf.data.as_text_dataset(source)          # path (.parquet/.arrow/.jsonl/.csv/.tsv/.json, a
                                                       # save_to_disk folder), datasets.Dataset, pyarrow.Table,
                                                       # list of row dicts, dict of columns, TextDataset
    fastinf.data.write_like(source, dest, keep=mask, extra_columns={"score": s, "flagged": f}, overwrite=False)
    fastinf.data.results_table(ds.ids, {"score": s, "rank": r}, as_="datasets" | "pandas" | "parquet", path=None)

* ``as_text_dataset`` opens Parquet (by row groups), Arrow files, ``save_to_disk`` folders, HF datasets and
  pyarrow tables lazily (``ArrowTextDataset``: texts stay in Arrow, only each batch's strings are built);
  csv/tsv/jsonl/json and Python rows are read into a ``TextDataset``. Columns, labels and ids are chosen and
  checked the same way for every source (``fastinf.data.columns``).
* ``write_like`` writes ``source``'s rows where ``keep`` is True (all rows when None), in order, every column
  untouched, plus ``extra_columns`` (one value per source row, or per kept row) appended at the end. The
  format is ``dest``'s suffix (``.parquet``, ``.arrow``, ``.jsonl``, ``.csv``, ``.tsv``, ``.json``; no suffix:
  a ``datasets`` ``save_to_disk`` folder) - name ``dest`` like the source to keep its format; Parquet/Arrow stream
  by batches, a ``.jsonl`` line by line (kept lines copied byte for byte when there are no extras). The
  result is written to a temporary name next to ``dest`` and renamed into place: a failure leaves nothing.
  ``dest`` may never be the input itself; an existing ``dest`` is refused unless ``overwrite=True`` (a folder
  then only when it is a ``save_to_disk`` folder).
* ``results_table`` builds a table of ``id`` (the dataset's ids) plus ``columns``: a ``datasets.Dataset``,
  a pandas ``DataFrame`` or a Parquet file at ``path`` (atomic, ``overwrite`` as above).
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastinf.data.arrow_rows import BATCH_ROWS, RowSource, TableRows
from fastinf.data.lazy import ArrowTextDataset
from fastinf.data.sources import ARROW_SUFFIXES, arrow_rows_of, is_arrow_source, is_disk_dataset
from fastinf.data.write_arrow import Extras, kept_batches, schema_plus, write_hf_disk, write_ipc, write_parquet, \
    write_rows
from fastinf.data.write_text import TEXT_FORMATS, count_rows, write_same_text
from fastinf.errors import DataError

__all__ = ["write_like", "results_table", "FORMATS"]

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json",
           **{s: "arrow" for s in ARROW_SUFFIXES}}
_DISK_ENTRIES = ("state.json", "dataset_info.json")


def _format_of(path: Path) -> str | None:
    """The format a path names: by suffix; a suffix-less name or a ``save_to_disk`` folder is ``hf-disk``."""
    if is_disk_dataset(path) or (not path.suffix and not path.is_file()):
        return "hf-disk"
    return FORMATS.get(path.suffix.lower())


def _source_of(source: Any) -> tuple[Any, Path | None, str]:
    """(the source object or path, its path if any, its format)."""
    if isinstance(source, ArrowTextDataset):
        if source.origin is None:
            raise DataError(f"{source.name}: this dataset is a subset or a stream, not a whole source; pass the file "
                            "or object it was opened from to write_like")
        source = source.origin
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{path}: file not found; write_like needs the source file the rows came from")
        fmt = _format_of(path)
        if fmt is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(FORMATS)} or a "
                            "save_to_disk folder")
        return path, path, fmt
    if is_arrow_source(source):
        return source, None, "arrow-object"
    if isinstance(source, (list, dict)):
        return source, None, "rows"
    raise DataError(f"write_like cannot write back a {type(source).__name__}; pass the file path, datasets.Dataset, "
                    "pyarrow.Table or rows the dataset was loaded from")


def _check_dest(dest: Path, src_path: Path | None, overwrite: bool) -> None:
    """Refuse writing onto (or into) the input, and an existing ``dest`` without ``overwrite``."""
    if src_path is not None:
        same = dest.exists() and os.path.samefile(dest, src_path)
        inside = src_path.is_dir() and dest.resolve().is_relative_to(src_path.resolve())
        if same or inside or dest.resolve() == src_path.resolve():
            raise DataError(f"{dest}: is the input itself; write_like never overwrites its source - pick another dest")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise DataError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it, or pick another dest")
        if dest.is_dir() and not _is_disk_folder(dest):
            raise DataError(f"{dest}: an existing folder that is not a save_to_disk dataset; overwrite replaces only "
                            "a file or such a folder - pick another dest")


def _is_disk_folder(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return (path / "state.json").is_file() and all(
        n in _DISK_ENTRIES or (n.startswith("data-") and n.endswith(".arrow")) for n in names)


@contextmanager
def _atomic(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest``, renamed onto it on success and removed on failure."""
    tmp = dest.with_name(f".{dest.name}.fastinf-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and dest.is_dir():
            old = dest.with_name(f".{dest.name}.fastinf-{uuid.uuid4().hex[:8]}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _keep_mask(keep: Any, n: int | None) -> np.ndarray | None:
    if keep is None:
        return None if n is None else np.ones(n, dtype=bool)
    arr = np.asarray(keep)
    if arr.ndim != 1 or arr.dtype != bool:
        raise DataError(f"keep must be a 1-D boolean mask over the rows, got {arr.dtype} of shape {arr.shape}")
    if n is not None and arr.size != n:
        raise DataError(f"keep has {arr.size} entries but the source has {n} rows; pass one entry per row")
    return arr


def _extras(extra: dict[str, Any] | None, keep: np.ndarray, existing: list[str] | None) -> Extras:
    """The extra columns over the kept rows (given per source row or per kept row)."""
    n, kept, out = keep.size, int(keep.sum()), {}
    for name, values in (extra or {}).items():
        if existing is not None and name in existing:
            raise DataError(f"extra column {name!r} already exists in the source; pick another name")
        v = np.asarray(values) if not isinstance(values, np.ndarray) and not isinstance(values, list) else values
        if len(v) == n:
            v = np.asarray(v)[keep] if isinstance(v, np.ndarray) else [x for x, k in zip(v, keep) if k]
        elif len(v) != kept:
            raise DataError(f"extra column {name!r} has {len(v)} values; give one per source row ({n}) or per kept "
                            f"row ({kept})")
        out[str(name)] = v
    return Extras(out, kept)


def _arrow_rows(obj: Any, fmt: str, header: bool | None, columns: Any) -> tuple[RowSource, Any]:
    """(rows, HF dataset or None) of an Arrow-shaped source, or of rows / a text file read into a table."""
    import pyarrow as pa

    if fmt in ("rows",) + TEXT_FORMATS:
        from fastinf.data.files import read_table

        try:
            if fmt == "rows":
                table = pa.Table.from_pylist(obj) if isinstance(obj, list) else pa.table(obj)
            else:
                table = pa.table(read_table(obj, header, columns))
        except (pa.ArrowException, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot convert the rows to a table ({first}); write to the source's own format") from e
        return TableRows(table), None
    if isinstance(obj, Path) and is_disk_dataset(obj):
        import datasets

        obj = datasets.load_from_disk(str(obj))
    hf = obj if type(obj).__module__.startswith("datasets") and type(obj).__name__ == "Dataset" else None
    return arrow_rows_of(obj)[0], hf


def write_like(source: Any, dest: str | os.PathLike, keep: Any = None, extra_columns: dict[str, Any] | None = None,
               overwrite: bool = False, *, header: bool | None = None, columns: Any = None) -> Path:
    """Write ``source``'s kept rows, every column untouched, plus ``extra_columns``, to ``dest`` (see the module
    docstring); ``header`` / ``columns`` read a headerless .csv/.tsv as the loader does. Returns ``dest``."""
    obj, src_path, src_fmt = _source_of(source)
    dest = Path(dest).expanduser()
    fmt = _format_of(dest)
    if fmt is None:
        raise DataError(f"{dest}: unknown output format {dest.suffix!r}; use one of {sorted(FORMATS)} or a name "
                        "without a suffix (a save_to_disk folder)")
    _check_dest(dest, src_path, overwrite)
    if src_fmt in TEXT_FORMATS and fmt == src_fmt:
        keep_ = _keep_mask(keep, count_rows(obj, src_fmt, header, columns))
        with _atomic(dest) as tmp:
            write_same_text(obj, tmp, fmt, keep_, _extras(extra_columns, keep_, None), header, columns)
        return dest
    rows, hf = _arrow_rows(obj, src_fmt, header, columns)
    keep_ = _keep_mask(keep, rows.num_rows)
    extras = _extras(extra_columns, keep_, rows.column_names)
    schema = schema_plus(rows.schema, extras)
    batches = kept_batches(rows.batches(rows.column_names, BATCH_ROWS), keep_, extras)
    with _atomic(dest) as tmp:
        if fmt == "parquet":
            write_parquet(tmp, schema, batches)
        elif fmt == "arrow":
            write_ipc(tmp, schema, batches)
        elif fmt == "hf-disk":
            write_hf_disk(tmp, hf, keep_, extras, schema, None if hf is not None else batches)
        else:
            write_rows(tmp, fmt, schema.names, batches)
    return dest


def results_table(ids: Any, columns: dict[str, Any], as_: str = "datasets", path: str | os.PathLike | None = None,
                  *, overwrite: bool = False, id_name: str = "id") -> Any:
    """A table of ``id_name`` (int64 ``ids``) then ``columns`` (one value per id): a ``datasets.Dataset``
    (``as_="datasets"``), a pandas ``DataFrame`` (``"pandas"``) or a Parquet file at ``path`` (``"parquet"``,
    written atomically; returns the path)."""
    import pyarrow as pa

    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"results_table: ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if id_name in columns:
        raise DataError(f"results_table: column {id_name!r} is the id column; rename that column")
    bad = next((k for k, v in columns.items() if len(v) != ids.size), None)
    if bad is not None:
        raise DataError(f"results_table: column {bad!r} has {len(columns[bad])} values for {ids.size} ids")
    table = pa.table({id_name: ids.astype(np.int64), **{k: np.asarray(v) if isinstance(v, np.ndarray) else list(v)
                                                        for k, v in columns.items()}})
    if as_ == "pandas":
        return table.to_pandas()
    if as_ == "datasets":
        import datasets

        return datasets.Dataset(table)
    if as_ != "parquet":
        raise DataError(f"results_table: as_ must be 'datasets', 'pandas' or 'parquet', got {as_!r}")
    if path is None:
        raise DataError("results_table: as_='parquet' needs path=")
    dest = Path(path).expanduser()
    _check_dest(dest, None, overwrite)
    with _atomic(dest) as tmp:
        write_parquet(tmp, table.schema, iter([table]))
    return dest
