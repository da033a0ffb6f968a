"""Parquet I/O of aggregated scores: the long-format file ``fastinf aggregate`` writes and ``ndr`` reads.

:func:`write_parquet` writes an :class:`~fastinf.aggregation.aggregate.Aggregation` as one row per
(train sample, group, how) with its rank and the settings as schema metadata, atomically (temporary name,
then rename); :func:`read_parquet` reads that long format, or a wide one, back as ``{"group/how": [N]}``.
Kept apart from the aggregation pass, which never touches files.

Integrity: the schema metadata carries a SHA-256 of the score columns (``digest``), so a damaged or edited
file is named on read instead of silently giving other scores; a truncated or non-Parquet file is a
ConfigError naming it. :func:`check_out_path` validates an output path before any work is done.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.aggregation.aggregate import Aggregation
from fastinf.errors import ConfigError
from fastinf.store.ownership import make_output_dir


def write_parquet(result: Aggregation, path: str | Any, *, train_ids: np.ndarray | None = None,
                  source: str | None = None) -> None:
    """Writes ``result`` as long-format Parquet: one row per (train sample, group, how).

    Columns: ``train`` (0-based index), ``group``, ``how``, ``score`` (float64), ``rank`` (int64 position
    in ascending score order, 0 = most detrimental; ties in train-index order), and ``train_id`` when
    ``train_ids`` is given. Aggregation settings are stored as JSON under the schema metadata key
    ``fastinf``. The file is written to a temporary name and renamed, so a crash leaves no partial file.
    """
    path = check_out_path(path)
    n = result.n_train
    if train_ids is not None and len(train_ids) != n:
        raise ConfigError(f"train_ids: expected {n} ids, found {len(train_ids)}")
    table = _long_table(result, train_ids)
    meta = {"vote_p": result.vote_p, "vote_k": result.vote_k, "correct_only": result.correct_only,
            "n_rankers": result.n_rankers, "groups": result.groups, "n_train": n, "source": source,
            **{k: v for k, v in result.meta.items() if k != "hows"}, "digest": _digest(table)}
    table = table.replace_schema_metadata({"fastinf": json.dumps(meta)})
    _write_atomically(table, path)


def check_out_path(path: str | Any, what: str = "path") -> Path:
    """``path`` as a Path if a Parquet file can be written there; a ConfigError naming the problem (an
    existing directory, a parent that is a file or not writable) otherwise. Missing parent directories are
    fine (they are created on write)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is a directory; name a .parquet file (e.g. {p / 'agg.parquet'})")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {p}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: cannot write into {parent} (permission denied); choose another output path")
    return p


def _digest(table: Any) -> str:
    """SHA-256 of the data columns (train, group, how, score, rank[, train_id]) in row order."""
    h = hashlib.sha256()
    for name in ("train", "group", "how", "score", "rank", "train_id"):
        if name not in table.column_names:
            continue
        col = table.column(name).to_numpy(zero_copy_only=False)
        h.update(name.encode())
        if col.dtype.kind in "OUS":
            h.update("\x00".join(map(str, col.tolist())).encode())
        else:
            h.update(np.ascontiguousarray(col).tobytes())
    return h.hexdigest()


def _long_table(result: Aggregation, train_ids: np.ndarray | None) -> Any:
    """The long-format pyarrow table: one row per (train sample, group, how), with its ascending rank."""
    import pyarrow as pa

    n = result.n_train
    cols: dict[str, list[np.ndarray]] = {"train": [], "group": [], "how": [], "score": [], "rank": []}
    if train_ids is not None:
        cols["train_id"] = []
    train = np.arange(n, dtype=np.int64)
    for (g, h), s in result.scores.items():
        rank = np.empty(n, np.int64)
        rank[np.argsort(s, kind="stable")] = train
        cols["train"].append(train)
        cols["group"].append(np.full(n, g, dtype=object))
        cols["how"].append(np.full(n, h, dtype=object))
        cols["score"].append(np.asarray(s, np.float64))
        cols["rank"].append(rank)
        if train_ids is not None:
            cols["train_id"].append(np.asarray(train_ids))
    return pa.table({k: pa.array(np.concatenate(v)) for k, v in cols.items()})


def _write_atomically(table: Any, path: Path) -> None:
    """Write ``table`` to a temporary name beside ``path`` and rename it (no partial file on a crash)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        make_output_dir(path.parent)           # a missing directory is created owner-only
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_parquet(path: str | Any) -> dict[str, np.ndarray]:
    """Reads aggregated scores back as ``{"group/how": float64 [N]}`` (ordered by ``train``).

    Accepts the long format of :func:`write_parquet` and a wide format (a ``train`` column, optional,
    plus one numeric column per scorer; ``rank``/``train_id`` columns are ignored).
    """
    table = _read_table(path)
    names = table.column_names
    if b"fastinf" in (table.schema.metadata or {}) and not {"train", "group", "how", "score"} <= set(names):
        raise ConfigError(f"{path}: written by fastinf aggregate but its columns are {names}, not train/group/how/"
                          "score; the file is damaged — write it again")
    if {"group", "how", "score"} <= set(names):
        _check_digest(table, path)
        df = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("group", "how", "score")}
        train = table.column("train").to_numpy() if "train" in names else None
        out: dict[str, np.ndarray] = {}
        keys = df["group"].astype(str) + "/" + df["how"].astype(str)
        for key in dict.fromkeys(keys.tolist()):
            sel = keys == key
            s = _floats(df["score"][sel], path, "score")
            if train is not None:
                t = train[sel]
                if not np.array_equal(np.sort(t), np.arange(t.size)):
                    raise ConfigError(f"{path}: rows of {key!r} do not cover train indices 0..{t.size - 1} once each")
                s = s[np.argsort(t)]
            out[key] = s
        return out
    order = np.argsort(table.column("train").to_numpy()) if "train" in names else None
    out = {}
    for c in names:
        if c in ("train", "rank", "train_id"):
            continue
        col = table.column(c).to_numpy(zero_copy_only=False)
        if col.dtype.kind not in "fiu":
            continue
        out[c] = col.astype(np.float64)[order] if order is not None else col.astype(np.float64)
    if not out:
        raise ConfigError(f"{path}: expected score columns (long format group/how/score, or numeric columns), "
                          f"found {names}")
    return out


def _read_table(path: str | Any) -> Any:
    """The pyarrow table of ``path``; a missing, truncated or non-Parquet file is a ConfigError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file; pass the .parquet `fastinf aggregate --out` wrote")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else e!r}); "
                          "it is truncated or damaged — write it again with `fastinf aggregate`") from None


def _check_digest(table: Any, path: str | Any) -> None:
    """Compare the data with the digest ``write_parquet`` recorded (files without one are not checked)."""
    raw = (table.schema.metadata or {}).get(b"fastinf")
    if raw is None:
        return
    try:
        want = json.loads(raw).get("digest")
    except (ValueError, AttributeError):
        raise ConfigError(f"{path}: its fastinf metadata is damaged (not a JSON object); write it again") from None
    if want is not None and _digest(table) != want:
        raise ConfigError(f"{path}: the scores do not match the checksum recorded when the file was written; "
                          "the file is damaged or was edited — write it again with `fastinf aggregate`")


def _floats(col: np.ndarray, path: str | Any, name: str) -> np.ndarray:
    """A numeric column as float64; a non-numeric one is named."""
    if col.dtype.kind not in "fiub":
        raise ConfigError(f"{path}: column {name!r} holds {col.dtype} values, expected numbers")
    return col.astype(np.float64)
