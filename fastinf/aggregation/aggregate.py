"""Aggregation: per-unit scores (units x test x train) -> one score per train sample.

A *ranker* is one (unit, test sample) pair: a row of N train scores. Aggregation combines the rankers
of a unit *group* into one score per train sample; **lowest = most detrimental** for every method.

==============  ==========================================================================================
``mean``        mean raw score over rankers (the usual sum over layers)
``rank``        each ranker ranks train samples ascending (0 = most detrimental, ties -> average rank);
                score = mean rank. The paper's Rank.
``vote``        ``K = round(p * N)`` (half up, at least 1; default p = 0.2); each ranker gives sample i
                ``max(0, K - rank_i)`` (rank with tie averaging, so a vote may be a half-integer);
                score = -sum of votes. The paper's Vote ("vote2").
``median``      median raw score over rankers
``min_rank``    lowest rank any ranker gives the sample
``rrf``         reciprocal-rank fusion: score = -sum over rankers of ``1 / (rrf_k + rank + 1)``
``zmean``       mean over rankers of z-scored rows (each ranker's N scores standardised; a constant row
                contributes 0)
==============  ==========================================================================================

How it runs: one pass over the scores, unit by unit and test block by test block (``unit_scores(name)
[m0:m1]``), so memory is bounded by the block size and N, never by M. Each block is ranked once (the
C++ path of :mod:`fastinf._native`; the numpy reference with ``backend="numpy"``) and accumulated into
an accumulator per *atom* - the set of units sharing the same group memberships - so that several
groups and methods cost one pass; a group's result is the sum of its atoms. Rank/vote/min-rank sums are
exact integers (doubled ranks), so results do not depend on block size, thread count or backend.
``median`` is the exception that cannot stream over rankers: it reads train-column chunks of all of a
group's rankers (``median_budget_bytes`` each) in a second pass.

``correct_only=True`` keeps only rankers whose test sample the model predicts correctly (the paper's
"-c"); it needs ``test_correct`` (from the ScoreSet, or passed with a plain array).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from fastinf.aggregation import _native
from fastinf.errors import ConfigError, NonFiniteError, SelectorError

HOWS: tuple[str, ...] = ("mean", "rank", "vote", "median", "min_rank", "rrf", "zmean")
_RANK_HOWS = {"rank", "vote", "min_rank", "rrf"}

#: A group: a selector string (``"middle"``, ``"first,last"``, ``"blocks[2:4]"``; see
#: :func:`fastinf.units.select`), or an explicit list of unit indices or unit names.
GroupSpec = Union[str, Sequence[int], Sequence[str]]


def vote_k(vote_p: float, n_train: int) -> int:
    """``K = round(p * N)`` (half up), at least 1: how many lowest-ranked samples get a vote."""
    if isinstance(vote_p, bool) or not (isinstance(vote_p, numbers.Real) and 0.0 < float(vote_p) <= 1.0):
        raise ConfigError(f"vote_p: expected a fraction in (0, 1], found {vote_p!r} (0.2 = the paper's default)")
    return max(1, min(n_train, int(math.floor(float(vote_p) * n_train + 0.5))))


# --------------------------------------------------------------------------------------------- sources
class _Source:
    """Uniform read access to a ScoreSet-like object or a plain (U, M, N) array."""

    def __init__(self, scores: Any, units: Sequence[Any] | None, test_correct: np.ndarray | None) -> None:
        self._open: tuple[int, Any] = (-1, None)
        if isinstance(scores, np.ndarray) or (hasattr(scores, "__array__") and not hasattr(scores, "unit_scores")):
            arr = np.asarray(scores)
            if arr.ndim != 3:
                raise ConfigError(
                    f"scores: expected per-unit scores of shape (units, test, train), found shape {arr.shape}; "
                    "for a single unit use arr[None]"
                )
            self._arr: np.ndarray | None = arr
            self._set = None
            n_units, self.n_test, self.n_train = arr.shape
            self.units = list(units) if units is not None else None
            if self.units is not None and len(self.units) != n_units:
                raise ConfigError(f"units: expected {n_units} entries (one per score unit), found {len(self.units)}")
            if self.units is None:
                self.unit_names = [f"unit{i}" for i in range(n_units)]
            else:
                self.unit_names = [u if isinstance(u, str) else u.name for u in self.units]
            self.unit_objs = [u for u in (self.units or []) if not isinstance(u, str)] or None
            correct = test_correct
        elif all(hasattr(scores, a) for a in ("unit_names", "n_test", "n_train", "unit_scores")):
            self._arr = None
            self._set = scores
            self.unit_names = list(scores.unit_names)
            self.n_test, self.n_train = int(scores.n_test), int(scores.n_train)
            objs = units if units is not None else getattr(scores, "units", None)
            self.unit_objs = [u for u in objs if not isinstance(u, str)] if objs is not None else None
            if self.unit_objs is not None and len(self.unit_objs) != len(self.unit_names):
                self.unit_objs = None
            correct = test_correct if test_correct is not None else getattr(scores, "test_correct", None)
        else:
            raise ConfigError(
                f"scores: expected a ScoreSet (from fastinf.score) or a (units, test, train) array, "
                f"found {type(scores).__name__}"
            )
        if not self.unit_names:
            raise ConfigError("scores: expected at least one unit, found none")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(f"scores: expected at least one test and one train sample, found M={self.n_test}, "
                              f"N={self.n_train}")
        self.test_correct = None if correct is None else np.asarray(correct, dtype=bool).reshape(-1)
        if self.test_correct is not None and self.test_correct.shape[0] != self.n_test:
            raise ConfigError(f"test_correct: expected {self.n_test} flags (one per test sample), found "
                              f"{self.test_correct.shape[0]}")

    def _unit(self, u: int) -> Any:
        """The [M, N] scores of unit ``u`` (a view / memory map; the last one is kept open)."""
        if self._arr is not None:
            return self._arr[u]
        if self._open[0] != u:
            self._open = (u, self._set.unit_scores(self.unit_names[u]))
        return self._open[1]

    def block(self, u: int, m0: int, m1: int) -> np.ndarray:
        """Scores of unit ``u`` for test rows ``m0:m1``; (m1 - m0, N)."""
        return np.asarray(self._unit(u)[m0:m1])

    def columns(self, u: int, rows: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Scores of unit ``u`` for test ``rows`` and train columns ``c0:c1``; (len(rows), c1 - c0)."""
        return np.asarray(self._unit(u)[:, c0:c1])[rows]


def _resolve_group(spec: GroupSpec, src: _Source) -> list[int]:
    """Unit indices (in score order) selected by one group spec."""
    names = src.unit_names
    if isinstance(spec, str):
        terms = [t.strip() for t in spec.split(",") if t.strip()]
        if terms and all(t in names for t in terms):  # exact unit names (and unions of them)
            return sorted({names.index(t) for t in terms})
        if spec.strip() == "all":
            return list(range(len(names)))
        if src.unit_objs is None:
            raise SelectorError(
                f"group {spec!r}: layer selectors need unit metadata (a ScoreSet, or units=[Unit, ...] with a "
                f"plain array), but these scores carry only unit names {names[:4]}{'...' if len(names) > 4 else ''}"
                "; give the group as unit names or indices instead"
            )
        from fastinf.extraction.units import select  # local: units imports torch-free helpers only when needed

        chosen = {u.name for u in select(src.unit_objs, spec)}
        idx = [i for i, n in enumerate(names) if n in chosen]
        if not idx:
            raise SelectorError(f"group {spec!r} matches none of the {len(names)} scored units; "
                                "check the selector (e.g. 'first', 'middle', 'last', 'all', 'blocks[2:4]')")
        return idx
    items = list(spec)
    if not items:
        raise SelectorError("group: expected a selector or a non-empty list of units, found an empty list")
    idx: list[int] = []
    for it in items:
        if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
            if not 0 <= int(it) < len(names):
                raise SelectorError(f"group: unit index {int(it)} is out of range for {len(names)} scored units")
            idx.append(int(it))
        elif isinstance(it, str) and it in names:
            idx.append(names.index(it))
        else:
            raise SelectorError(f"group: {it!r} is neither a unit index nor one of the scored unit names")
    return sorted(set(idx))


def _resolve_groups(groups: Any, src: _Source) -> dict[str, list[int]]:
    if groups is None:
        return {"all": list(range(len(src.unit_names)))}
    if isinstance(groups, str):
        return {groups: _resolve_group(groups, src)}
    if isinstance(groups, Mapping):
        items = [(str(k), v) for k, v in groups.items()]
    else:
        seq = list(groups)
        if seq and all(isinstance(g, (int, np.integer)) for g in seq):
            items = [("group", seq)]  # a single list of indices
        else:
            items = [(g if isinstance(g, str) else ",".join(map(str, g)), g) for g in seq]
    if not items:
        raise SelectorError("groups: expected at least one group, found none")
    return {name: _resolve_group(spec, src) for name, spec in items}


# -------------------------------------------------------------------------------------- accumulators
@dataclass
class _Acc:
    """Running sums of one atom (set of units with identical group memberships)."""

    n: int
    hows: frozenset[str]
    rankers: int = 0
    sum: np.ndarray | None = None
    zsum: np.ndarray | None = None
    rank2: np.ndarray | None = None
    vote2: np.ndarray | None = None
    min2: np.ndarray | None = None
    rrf: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.n
        if "mean" in self.hows:
            self.sum = np.zeros(n, np.float64)
        if "zmean" in self.hows:
            self.zsum = np.zeros(n, np.float64)
        if "rank" in self.hows:
            self.rank2 = np.zeros(n, np.int64)
        if "vote" in self.hows:
            self.vote2 = np.zeros(n, np.int64)
        if "min_rank" in self.hows:
            self.min2 = np.full(n, np.iinfo(np.int64).max, np.int64)
        if "rrf" in self.hows:
            self.rrf = np.zeros(n, np.float64)

    def add(self, block: np.ndarray, k: int, rrf_k: int, backend: str | None, n_threads: int | None) -> None:
        self.rankers += block.shape[0]
        if self.sum is not None:
            self.sum += block.sum(axis=0, dtype=np.float64)
        if self.zsum is not None:
            b64 = block.astype(np.float64)
            mu = b64.mean(axis=1, keepdims=True)
            sd = b64.std(axis=1, keepdims=True)
            z = np.divide(b64 - mu, sd, out=np.zeros_like(b64), where=sd > 0)
            self.zsum += z.sum(axis=0)
        if self.hows & _RANK_HOWS:
            _native.accumulate_ranks(block, vote_k=k, rank_sum2=self.rank2, vote_sum2=self.vote2,
                                     min_rank2=self.min2, rrf_sum=self.rrf, rrf_k=rrf_k, backend=backend,
                                     n_threads=n_threads)


def _finish(how: str, atoms: list[_Acc]) -> np.ndarray:
    rankers = sum(a.rankers for a in atoms)
    if how == "mean":
        return sum(a.sum for a in atoms) / rankers
    if how == "zmean":
        return sum(a.zsum for a in atoms) / rankers
    if how == "rank":
        return sum(a.rank2 for a in atoms).astype(np.float64) / (2.0 * rankers)
    if how == "vote":
        return -sum(a.vote2 for a in atoms).astype(np.float64) / 2.0
    if how == "min_rank":
        return np.minimum.reduce([a.min2 for a in atoms]).astype(np.float64) / 2.0
    if how == "rrf":
        return -sum(a.rrf for a in atoms)
    raise AssertionError(how)  # pragma: no cover - validated on entry


# ------------------------------------------------------------------------------------------- results
@dataclass
class Aggregation:
    """Result of :func:`aggregate_all`: one float64 [N] score per (group, how); lowest = most detrimental."""

    scores: dict[tuple[str, str], np.ndarray]
    groups: dict[str, list[str]]  # group name -> unit names
    n_rankers: dict[str, int]  # group name -> rankers used
    n_train: int
    vote_p: float
    vote_k: int
    correct_only: bool
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, group: str, how: str) -> np.ndarray:
        """The score array of one (group, how); raises KeyError naming what exists."""
        try:
            return self.scores[(group, how)]
        except KeyError:
            raise KeyError(f"no result for group={group!r}, how={how!r}; have {sorted(self.scores)}") from None


def _parse_hows(how: str | Sequence[str]) -> list[str]:
    hows = [h.strip() for h in how.split(",")] if isinstance(how, str) else [str(h) for h in how]
    hows = [h for h in hows if h]
    bad = [h for h in hows if h not in HOWS]
    if bad or not hows:
        raise ConfigError(f"how: expected one or more of {HOWS}, found {bad or how!r}")
    return list(dict.fromkeys(hows))


def aggregate_all(
    scores: Any,
    how: str | Sequence[str] = "rank",
    *,
    vote_p: float = 0.2,
    correct_only: bool = False,
    groups: Any = None,
    units: Sequence[Any] | None = None,
    test_correct: np.ndarray | None = None,
    rrf_k: int = 60,
    block_bytes: int = 32 << 20,
    median_budget_bytes: int = 256 << 20,
    backend: str | None = None,
    n_threads: int | None = None,
) -> Aggregation:
    """Aggregates per-unit scores for every (group, how) in one pass; see the module docstring.

    Args:
        scores: a ScoreSet (``unit_names``, ``n_test``, ``n_train``, ``unit_scores(name) -> [M, N]``,
            optional ``units`` and ``test_correct``) or an array (units, test, train).
        how: a method name, a comma-separated list, or a sequence of names from :data:`HOWS`.
        vote_p: fraction of N that receives votes (``K = round(p * N)``), in (0, 1].
        correct_only: use only test samples the model predicts correctly (needs ``test_correct``).
        groups: None (all units), one selector, a sequence of selectors / index lists, or a mapping
            name -> selector / index list. Selectors need Unit metadata (ScoreSet or ``units=``).
        units: unit metadata for a plain array (``fastinf.units.Unit`` objects or names).
        test_correct: per-test-sample correctness for a plain array (overrides the ScoreSet's).
        rrf_k: the constant of reciprocal-rank fusion.
        block_bytes: float32 bytes per test block read (memory bound of the streaming pass).
        median_budget_bytes: bytes per train-column chunk of the median pass.
        backend: ``"cpp"`` / ``"numpy"`` for rank accumulation (default: see :mod:`fastinf._native`).
        n_threads: C++ threads (default: ``FASTINF_NUM_THREADS`` or the available CPUs).
    """
    hows = _parse_hows(how)
    src = _Source(scores, units, test_correct)
    n, m = src.n_train, src.n_test
    k = vote_k(vote_p, n)
    if rrf_k < 0:
        raise ConfigError(f"rrf_k: expected a non-negative integer, found {rrf_k}")
    group_idx = _resolve_groups(groups, src)
    rows_ok = np.ones(m, dtype=bool)
    if correct_only:
        if src.test_correct is None:
            raise ConfigError("correct_only=True needs per-test correctness: the ScoreSet has no test_correct; "
                              "pass test_correct=[bool] * n_test")
        rows_ok = src.test_correct
        if not rows_ok.any():
            raise ConfigError(f"correct_only=True but none of the {m} test samples is predicted correctly; "
                              "aggregate without correct_only")

    # Atoms: units grouped by the set of groups they belong to (units in no group are never read).
    member: dict[int, frozenset[str]] = {}
    for g, idx in group_idx.items():
        for u in idx:
            member[u] = member.get(u, frozenset()) | {g}
    atom_of_sig: dict[frozenset[str], int] = {}
    for u in sorted(member):
        atom_of_sig.setdefault(member[u], len(atom_of_sig))
    stream_hows = frozenset(h for h in hows if h != "median")
    atoms = [_Acc(n, stream_hows) for _ in atom_of_sig]

    if stream_hows:
        block_rows = max(1, min(m, block_bytes // (4 * n)))
        for u in sorted(member):
            acc = atoms[atom_of_sig[member[u]]]
            for m0 in range(0, m, block_rows):
                m1 = min(m, m0 + block_rows)
                keep = rows_ok[m0:m1]
                if not keep.any():
                    continue
                block = src.block(u, m0, m1)
                if not keep.all():
                    block = block[keep]
                block = np.ascontiguousarray(block, dtype=np.float32)
                if not np.isfinite(block).all():
                    bad = m0 + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                    raise NonFiniteError(f"scores of unit {src.unit_names[u]!r} hold NaN/inf (first in a test "
                                         f"block starting near row {bad}); fix the scores before aggregating")
                acc.add(block, k, rrf_k, backend, n_threads)

    out: dict[tuple[str, str], np.ndarray] = {}
    n_rankers: dict[str, int] = {}
    n_rows = int(rows_ok.sum())
    for g, idx in group_idx.items():
        g_atoms = [atoms[i] for sig, i in atom_of_sig.items() if g in sig]
        n_rankers[g] = len(idx) * n_rows
        for h in hows:
            out[(g, h)] = (_median(src, idx, rows_ok, median_budget_bytes) if h == "median"
                           else _finish(h, g_atoms))
    return Aggregation(
        scores=out,
        groups={g: [src.unit_names[i] for i in idx] for g, idx in group_idx.items()},
        n_rankers=n_rankers,
        n_train=n,
        vote_p=float(vote_p),
        vote_k=k,
        correct_only=bool(correct_only),
        meta={"hows": hows, "rrf_k": rrf_k, "n_test": m, "n_test_used": n_rows},
    )


def _median(src: _Source, idx: list[int], rows_ok: np.ndarray, budget: int) -> np.ndarray:
    """Median over the group's rankers, by train-column chunks of at most ``budget`` bytes."""
    rows = np.flatnonzero(rows_ok)
    n_rank = len(idx) * len(rows)
    chunk = max(1, min(src.n_train, budget // (4 * n_rank)))
    res = np.empty(src.n_train, np.float64)
    for c0 in range(0, src.n_train, chunk):
        c1 = min(src.n_train, c0 + chunk)
        cols = np.concatenate([src.columns(u, rows, c0, c1).astype(np.float32) for u in idx], axis=0)
        if not np.isfinite(cols).all():
            raise NonFiniteError(f"scores hold NaN/inf in train columns {c0}:{c1}; fix the scores before aggregating")
        res[c0:c1] = np.median(cols.astype(np.float64), axis=0)
    return res


def aggregate(
    scores: Any,
    how: str | Sequence[str] = "rank",
    *,
    vote_p: float = 0.2,
    correct_only: bool = False,
    groups: Any = None,
    **kwargs: Any,
) -> np.ndarray | dict[Any, np.ndarray]:
    """One score per train sample from per-unit scores (lowest = most detrimental).

    Returns a float64 [N] array when ``groups`` names one group (None or one selector string) and ``how``
    is one method; otherwise a dict keyed by group name (several groups, one method), by method (one
    group, several methods) or by ``(group, how)`` (several of both). See :func:`aggregate_all` for the
    arguments and :data:`HOWS` for the methods::

        agg = fastinf.aggregate(scores, how="rank", groups=["middle", "all"])
        agg["middle"]  # [N]
    """
    res = aggregate_all(scores, how, vote_p=vote_p, correct_only=correct_only, groups=groups, **kwargs)
    hows = res.meta["hows"]
    several_hows = not isinstance(how, str) or len(hows) > 1
    several_groups = not (groups is None or isinstance(groups, str))
    if not several_groups and not several_hows:
        return next(iter(res.scores.values()))
    if several_groups and not several_hows:
        return {g: v for (g, _), v in res.scores.items()}
    if several_hows and not several_groups:
        return {h: v for (_, h), v in res.scores.items()}
    return dict(res.scores)


# --------------------------------------------------------------------------------------------- I/O
def write_parquet(result: Aggregation, path: str | Any, *, train_ids: np.ndarray | None = None,
                  source: str | None = None) -> None:
    """Writes ``result`` as long-format Parquet: one row per (train sample, group, how).

    Columns: ``train`` (0-based index), ``group``, ``how``, ``score`` (float64), ``rank`` (int64 position
    in ascending score order, 0 = most detrimental; ties in train-index order), and ``train_id`` when
    ``train_ids`` is given. Aggregation settings are stored as JSON under the schema metadata key
    ``fastinf``. The file is written to a temporary name and renamed, so a crash leaves no partial file.
    """
    import json
    import os
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    n = result.n_train
    if train_ids is not None and len(train_ids) != n:
        raise ConfigError(f"train_ids: expected {n} ids, found {len(train_ids)}")
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
    table = pa.table({k: pa.array(np.concatenate(v)) for k, v in cols.items()})
    meta = {"vote_p": result.vote_p, "vote_k": result.vote_k, "correct_only": result.correct_only,
            "n_rankers": result.n_rankers, "groups": result.groups, "n_train": n, "source": source,
            **{k: v for k, v in result.meta.items() if k != "hows"}}
    table = table.replace_schema_metadata({"fastinf": json.dumps(meta)})
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
