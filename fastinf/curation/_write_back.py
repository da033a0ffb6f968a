"""Private fallback of ``fastinf.data.write_like``: a source's rows written back in the source's own format.

Used only while the data layer does not provide ``write_like``. Formats: ``.parquet`` (pyarrow; schema and
metadata kept), ``.jsonl`` (each kept line's object, keys in order, plus the extra keys), ``.csv`` /
``.tsv`` (the header and every field kept verbatim as text, plus the extra columns), a ``datasets``
``save_to_disk`` directory, and in-memory sources (``datasets.Dataset``, ``pyarrow.Table``, dict of columns,
list of rows) as Parquet. Written to a temporary name beside ``dest`` and renamed, so a failure leaves
nothing half-written.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import DataError

__all__ = ["write_like"]


def _pylist(v: Any) -> list:
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


def _check(n: int, keep: np.ndarray, extra: dict[str, Any]) -> tuple[np.ndarray, dict[str, list]]:
    keep = np.asarray(keep, bool)
    if keep.shape != (n,):
        raise DataError(f"keep: expected a boolean mask over the {n} rows, found shape {keep.shape}")
    cols = {k: _pylist(v) for k, v in extra.items()}
    bad = next((k for k, v in cols.items() if len(v) != n), None)
    if bad is not None:
        raise DataError(f"extra column {bad!r} has {len(cols[bad])} values for {n} rows")
    return keep, {k: [x for x, m in zip(v, keep) if m] for k, v in cols.items()}


def _json_value(x: Any) -> Any:
    return None if isinstance(x, float) and x != x else x


def _jsonl(src: Path, tmp: Path, keep: np.ndarray, extra: dict[str, Any]) -> None:
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep, cols = _check(len(lines), keep, extra)
    with open(tmp, "w", encoding="utf-8") as f:
        for j, line in enumerate(ln for ln, m in zip(lines, keep) if m):
            obj = json.loads(line)
            obj.update({k: _json_value(v[j]) for k, v in cols.items()})
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _delimited(src: Path, tmp: Path, keep: np.ndarray, extra: dict[str, Any]) -> None:
    delim = "\t" if src.suffix.lower() == ".tsv" else ","
    with open(src, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter=delim))
    header, body = rows[0], [r for r in rows[1:] if r]
    keep, cols = _check(len(body), keep, extra)
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delim, lineterminator="\n")
        w.writerow(header + list(cols))
        for j, r in enumerate(r for r, m in zip(body, keep) if m):
            w.writerow(r + [v[j] for v in cols.values()])


def _arrow(table: Any, keep: np.ndarray, extra: dict[str, Any]) -> Any:
    import pyarrow as pa

    keep, cols = _check(table.num_rows, keep, extra)
    out = table.filter(pa.array(keep))
    for k, v in cols.items():
        out = out.append_column(k, pa.array(v))
    return out


def _parquet(src: Path, tmp: Path, keep: np.ndarray, extra: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    pq.write_table(_arrow(pq.read_table(src), keep, extra), tmp)


def _hf_dir(src: Path, tmp: Path, keep: np.ndarray, extra: dict[str, Any]) -> None:
    import datasets

    ds = datasets.load_from_disk(str(src))
    keep, cols = _check(len(ds), keep, extra)
    out = ds.select(np.flatnonzero(keep))
    for k, v in cols.items():
        out = out.add_column(k, v)
    out.save_to_disk(str(tmp))


def _in_memory(source: Any, tmp: Path, keep: np.ndarray, extra: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if hasattr(source, "texts") and hasattr(source, "fingerprint"):          # a fastinf TextDataset
        cols = {"text": source.texts, **({"text_pair": source.text_pairs} if source.text_pairs else {}),
                **({"label": np.asarray(source.labels)} if source.labels is not None else {})}
        table = pa.table(cols)
    elif hasattr(source, "data") and hasattr(source, "column_names") and not isinstance(source, pa.Table):
        table = source.data.table if hasattr(source.data, "table") else pa.table(source.to_dict())
    elif isinstance(source, pa.Table):
        table = source
    elif isinstance(source, dict):
        table = pa.table({k: list(v) for k, v in source.items()})
    else:
        table = pa.Table.from_pylist(list(source))
    pq.write_table(_arrow(table, keep, extra), tmp)


def write_like(source: Any, dest: str | os.PathLike, *, keep: np.ndarray, extra_columns: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write the rows ``keep`` of ``source`` (plus ``extra_columns``) to ``dest`` in the source's format."""
    from fastinf.curation.inputs import is_hf_disk_dir

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise DataError(f"{dest} exists; pass overwrite=True or choose another path")
    if dest.is_dir() and not dest.is_symlink() and not is_hf_disk_dir(dest):   # never a folder fastinf did not write
        raise DataError(f"{dest}: an existing folder that is not a save_to_disk dataset; overwrite replaces only "
                        "files and datasets - move it away or choose another path")
    tmp = dest.with_name(f".{dest.name}.tmp")
    extra = dict(extra_columns or {})
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        kinds = {".jsonl": _jsonl, ".csv": _delimited, ".tsv": _delimited, ".parquet": _parquet}
        fn = _hf_dir if is_hf_disk_dir(src) else kinds.get(src.suffix.lower())
        if fn is None:
            raise DataError(f"{src}: cannot write back a {src.suffix or 'directory'} source; fastinf writes "
                            ".parquet, .jsonl, .csv, .tsv and datasets save_to_disk directories")
        fn(src, tmp, keep, extra)
    else:
        _in_memory(source, tmp, keep, extra)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest
