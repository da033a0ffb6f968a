"""The per-test aggregation result and its files: a directory of ``.npy`` matrices, and long-format Parquet.

Directory layout (written by :func:`write_streamed` / :func:`save_per_test`)::

    per_test.json    {"kind": "fastinf per-test aggregation", "format": 1, n_test, n_train, vote_p, vote_k,
                      dtype, groups {name: [unit names]}, files [{group, how, file}], meta}
    m<i>.npy         the [M, N] matrix of files[i] (np.lib.format; memory-mapped on open)

The matrices are filled under temporary names and renamed when complete; the manifest is written last,
so a directory without ``per_test.json`` is never mistaken for a finished result. ``overwrite`` removes
only a directory of this kind (:mod:`fastinf.store.ownership`); anything else is refused before work.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.aggregation.inputs import load_npy
from fastinf.errors import ConfigError
from fastinf.store.ownership import ArtifactKind, check_removable, make_output_dir, remove_own_artifact

__all__ = ["PerTestAggregation", "PerTestBlock", "PER_TEST_KIND", "write_streamed", "save_per_test", "open_per_test", "write_per_test_parquet"]

@dataclass
class PerTestBlock:
    """Test rows ``m0:m1`` of every (group, how) matrix: ``values[(group, how)]`` is float64 [m1 - m0, N]."""

    m0: int
    m1: int
    values: dict[tuple[str, str], np.ndarray]


@dataclass
class PerTestAggregation:
    """One [M, N] matrix per (group, how) (float32 or float64; memory-mapped when read from disk)."""

    scores: dict[tuple[str, str], np.ndarray]
    groups: dict[str, list[str]]
    n_test: int
    n_train: int
    vote_p: float
    vote_k: int
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def get(self, group: str, how: str) -> np.ndarray:
        """The [M, N] matrix of one (group, how); KeyError naming what exists."""
        try:
            return self.scores[(group, how)]
        except KeyError:
            raise KeyError(f"no per-test result for group={group!r}, how={how!r}; have {sorted(self.scores)}") from None

    def save(self, path: str | Path, *, overwrite: bool = False) -> "PerTestAggregation":
        """Write the matrices as ``.npy`` files plus ``per_test.json`` (see :mod:`.per_test_io`)."""
        return save_per_test(self, path, overwrite=overwrite)

    @classmethod
    def open(cls, path: str | Path) -> "PerTestAggregation":
        """Read a directory :meth:`save` wrote (memory-mapped, validated)."""
        return open_per_test(path)

    def to_parquet(self, path: str | Path, *, k: int | None = None, which: str = "both",
                   test_ids: np.ndarray | None = None, train_ids: np.ndarray | None = None) -> Path:
        """Long-format Parquet (test, train, group, how, score, rank[, ids]); ``k`` keeps per test row the
        ``k`` lowest (``which="opponents"``), highest (``"proponents"``) or both."""
        return write_per_test_parquet(self, path, k=k, which=which, test_ids=test_ids, train_ids=train_ids)



MANIFEST = "per_test.json"
_KIND = "fastinf per-test aggregation"
PER_TEST_KIND = ArtifactKind("fastinf per-test aggregation directory", MANIFEST,
                             entries=lambda n: n == MANIFEST or bool(re.fullmatch(r"\.?m\d+\.npy(\.tmp)?", n)),
                             is_own=lambda m: m.get("kind") == _KIND)


def _prepare(out: str | Path, overwrite: bool) -> Path:
    """The output directory, new or emptied (only if it is ours and ``overwrite``); refused otherwise."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        if not overwrite:
            check_removable(p, PER_TEST_KIND, what="writing")   # names a foreign directory first
            raise ConfigError(f"{p} already holds a per-test aggregation; pass overwrite=True to replace it")
        remove_own_artifact(p, PER_TEST_KIND)
    return make_output_dir(p)


def _files(res: PerTestAggregation) -> list[dict[str, str]]:
    """One file entry per (group, how), in group-then-method order."""
    keys = [(g, h) for g in res.groups for h in res.meta["hows"]]
    return [{"group": g, "how": h, "file": f"m{i}.npy"} for i, (g, h) in enumerate(keys)]


def _manifest(res: PerTestAggregation, files: list[dict[str, str]]) -> dict[str, Any]:
    return {"kind": _KIND, "format": 1, "n_test": res.n_test, "n_train": res.n_train, "vote_p": res.vote_p,
            "vote_k": res.vote_k, "dtype": res.meta.get("dtype", "float32"), "groups": res.groups,
            "files": files, "meta": {k: v for k, v in res.meta.items() if k != "dtype"}}


def write_streamed(res: PerTestAggregation, blocks: Iterable[PerTestBlock], out: str | Path, *,
                   overwrite: bool = False) -> PerTestAggregation:
    """Fill one ``.npy`` per (group, how) from the streamed ``blocks``; returns ``res`` opened from disk."""
    path = _prepare(out, overwrite)
    files = _files(res)
    dtype = np.dtype(res.meta.get("dtype", "float32"))
    tmp = {(f["group"], f["how"]): path / f".{f['file']}.tmp" for f in files}
    arrays = {k: np.lib.format.open_memmap(t, mode="w+", dtype=dtype, shape=(res.n_test, res.n_train))
              for k, t in tmp.items()}
    for blk in blocks:
        for key, v in blk.values.items():
            arrays[key][blk.m0:blk.m1] = v
    for key, arr in arrays.items():
        arr.flush()
        del arr
    arrays.clear()
    for f in files:
        tmp[(f["group"], f["how"])].replace(path / f["file"])
    _write_json(path / MANIFEST, _manifest(res, files))
    return open_per_test(path)


def save_per_test(res: PerTestAggregation, out: str | Path, *, overwrite: bool = False) -> PerTestAggregation:
    """Write an in-memory result to ``out`` (the layout above); returns it opened from disk."""
    blk = PerTestBlock(0, res.n_test, {k: np.asarray(v) for k, v in res.scores.items()})
    return write_streamed(res, [blk], out, overwrite=overwrite)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def open_per_test(path: str | Path) -> PerTestAggregation:
    """Open a per-test directory (memory-mapped); a ConfigError names a missing, foreign or damaged one."""
    p = Path(path)
    try:
        man = json.loads((p / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no {MANIFEST}; not a (finished) per-test aggregation — aggregate again") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}/{MANIFEST}: cannot read it ({e}); it is damaged — aggregate again") from None
    if not isinstance(man, dict) or man.get("kind") != _KIND:
        raise ConfigError(f"{p}: {MANIFEST} is not a fastinf per-test manifest")
    shape = (int(man["n_test"]), int(man["n_train"]))
    scores = {}
    for f in man["files"]:
        arr = load_npy(p / f["file"], "per-test scores")
        if arr.shape != shape:
            raise ConfigError(f"{p / f['file']}: shape {arr.shape}, the manifest says {shape}; it is damaged")
        scores[(f["group"], f["how"])] = arr
    meta = {**man.get("meta", {}), "dtype": man.get("dtype", "float32")}
    return PerTestAggregation(scores=scores, groups=man["groups"], n_test=shape[0], n_train=shape[1],
                              vote_p=float(man["vote_p"]), vote_k=int(man["vote_k"]), meta=meta, path=p)


def _selected(row: np.ndarray, k: int | None, which: str) -> np.ndarray:
    """Train indices kept for one test row: all, or the k lowest / highest / both (ascending score order)."""
    order = np.argsort(row, kind="stable")
    if k is None or k >= row.size:
        return order
    if which == "opponents":
        return order[:k]
    if which == "proponents":
        return order[-k:]
    return np.unique(np.concatenate([order[:k], order[-k:]]))


def write_per_test_parquet(res: PerTestAggregation, path: str | Path, *, k: int | None = None,
                           which: str = "both", test_ids: np.ndarray | None = None,
                           train_ids: np.ndarray | None = None) -> Path:
    """Long format: one row per (test, kept train sample, group, how) with ``score`` and ``rank`` (0 = most
    detrimental for that test, ties in train order); ``test_id`` / ``train_id`` when given. Atomic write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastinf.aggregation.parquet import check_out_path

    if which not in ("both", "proponents", "opponents"):
        raise ConfigError(f"which: expected 'both', 'proponents' or 'opponents', found {which!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k: expected a positive integer or None, found {k!r}")
    for name, ids, size in (("test_ids", test_ids, res.n_test), ("train_ids", train_ids, res.n_train)):
        if ids is not None and len(ids) != size:
            raise ConfigError(f"{name}: expected {size} ids, found {len(ids)}")
    out = check_out_path(path)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("test", "train", "group", "how", "score", "rank")}
    for (g, h), mat in res.scores.items():
        for t in range(res.n_test):
            row = np.asarray(mat[t], dtype=np.float64)
            keep = _selected(row, k, which)
            pos = np.empty(row.size, np.int64)
            pos[np.argsort(row, kind="stable")] = np.arange(row.size)
            for c, v in (("test", np.full(keep.size, t)), ("train", keep), ("group", np.full(keep.size, g, object)),
                         ("how", np.full(keep.size, h, object)), ("score", row[keep]), ("rank", pos[keep])):
                cols[c].append(v)
    data = {c: np.concatenate(v) if v else np.array([]) for c, v in cols.items()}
    if test_ids is not None:
        data["test_id"] = np.asarray(test_ids)[data["test"].astype(np.int64)]
    if train_ids is not None:
        data["train_id"] = np.asarray(train_ids)[data["train"].astype(np.int64)]
    table = pa.table({c: pa.array(v.tolist() if v.dtype == object else v) for c, v in data.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table.replace_schema_metadata({"fastinf": json.dumps({"kind": "per-test", "k": k,
                                                                         "which": which})}), tmp)
    tmp.replace(out)
    return out
