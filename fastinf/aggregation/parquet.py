"""Parquet I/O of aggregated scores: the long-format file ``fastinf aggregate`` writes and ``ndr`` reads.

:func:`write_parquet` writes an :class:`~fastinf.aggregation.aggregate.Aggregation` as one row per
(train sample, group, how) with its rank and the settings as schema metadata, atomically (temporary name,
then rename); :func:`read_parquet` reads that long format, or a wide one, back as ``{"group/how": [N]}``.
Kept apart from the aggregation pass, which never touches files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.aggregation.aggregate import Aggregation
from fastinf.errors import ConfigError


def write_parquet(result: Aggregation, path: str | Any, *, train_ids: np.ndarray | None = None,
                  source: str | None = None) -> None:
    """Writes ``result`` as long-format Parquet: one row per (train sample, group, how).

    Columns: ``train`` (0-based index), ``group``, ``how``, ``score`` (float64), ``rank`` (int64 position
    in ascending score order, 0 = most detrimental; ties in train-index order), and ``train_id`` when
    ``train_ids`` is given. Aggregation settings are stored as JSON under the schema metadata key
    ``fastinf``. The file is written to a temporary name and renamed, so a crash leaves no partial file.
    """
    path = Path(path)
    n = result.n_train
    if train_ids is not None and len(train_ids) != n:
        raise ConfigError(f"train_ids: expected {n} ids, found {len(train_ids)}")
    table = _long_table(result, train_ids)
    meta = {"vote_p": result.vote_p, "vote_k": result.vote_k, "correct_only": result.correct_only,
            "n_rankers": result.n_rankers, "groups": result.groups, "n_train": n, "source": source,
            **{k: v for k, v in result.meta.items() if k != "hows"}}
    table = table.replace_schema_metadata({"fastinf": json.dumps(meta)})
    _write_atomically(table, path)


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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_parquet(path: str | Any) -> dict[str, np.ndarray]:
    """Reads aggregated scores back as ``{"group/how": float64 [N]}`` (ordered by ``train``).

    Accepts the long format of :func:`write_parquet` and a wide format (a ``train`` column, optional,
    plus one numeric column per scorer; ``rank``/``train_id`` columns are ignored).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = table.column_names
    if {"group", "how", "score"} <= set(names):
        df = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("group", "how", "score")}
        train = table.column("train").to_numpy() if "train" in names else None
        out: dict[str, np.ndarray] = {}
        keys = df["group"].astype(str) + "/" + df["how"].astype(str)
        for key in dict.fromkeys(keys.tolist()):
            sel = keys == key
            s = df["score"][sel].astype(np.float64)
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
