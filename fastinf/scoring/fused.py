"""Fused score -> aggregate: per-unit influence scores fed straight into the aggregation accumulators.

``fastinf.influence(test, train, method, how, groups)`` gives what the two-stage path
``fastinf.aggregate_all(fastinf.score(test, train, method), how, groups=groups)`` gives, without writing
(or holding) the M x N x U score tensor. Per unit and per test block of m rows, train blocks stream
through one GEMM each (the loop of ``fastinf.score`` itself, :func:`~fastinf.scoring.pairwise._score_pairwise`,
with the same preconditioning, sign and float32 values) into one m x N slab; the slab is ranked once (the
C++ path of :mod:`fastinf.aggregation._native`) and added to the accumulator of the unit's *atom* (the
units sharing the same group memberships), so every group and every ``how`` costs one pass. Memory is
O(m N) plus the accumulators, independent of M and of the number of units; units in no group are not
scored at all.

Equality with the two-stage path: with the same ``block_bytes``, the test blocks are the ones
``fastinf.score`` uses whenever that m x N slab fits in ``block_bytes`` (at the defaults, k = 256 and
M = 1000: N up to ~67k), or when ``test_block`` equals the two-stage block; the scores are then
bit-identical, so the rank / vote / min-rank sums are identical integers and mean / zmean / rrf agree to
float64 rounding. With other blocks (a smaller slab at large N) the BLAS (MKL) may round some scores
differently in the last bit: its result for a row depends on how many rows the GEMM has.

``median`` cannot stream over rankers (it needs every ranker of a train sample at once) and is refused,
as are the methods that are not one GEMM per unit (selfinf, loss, repsim, tracin_we): use the two-stage
path for those. ``correct_only`` scores every test row (as the two-stage path does) and feeds only the
correctly predicted ones, so that the scores keep the two-stage GEMM shapes.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.aggregation.accumulators import _Acc, _finish
from fastinf.aggregation.aggregate import Aggregation, _atoms, _parse_hows, _test_rows, vote_k
from fastinf.aggregation.sources import _resolve_groups, _Source
from fastinf.errors import ConfigError, NonFiniteError
from fastinf.scoring.estimators import (
    METHODS,
    _check_arguments,
    _curvature_kwargs,
    _make_plan,
    _make_terms,
    _open,
    _progress,
)
from fastinf.scoring.pairwise import _score_pairwise
from fastinf.scoring.planning import DEFAULT_BLOCK_BYTES, _dtype, _n_steps, _Plan
from fastinf.scoring.setups import _setup_pairwise

__all__ = ["influence", "FUSED_METHODS", "FUSED_HOWS"]

FUSED_METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa")
FUSED_HOWS = ("mean", "rank", "vote", "min_rank", "rrf", "zmean")
_ZMEAN_BYTES = 64 << 20  # float64 temporaries of one zmean accumulation step


@dataclasses.dataclass
class _Run:
    """Everything a fused run needs, checked before any work: the plan and the aggregation layout."""

    plan: _Plan
    curv: dict
    hows: list[str]
    group_idx: dict[str, list[int]]
    unit_names: list[str]
    atom_of_unit: list[int]      # plan unit index -> atom index
    atoms: list[_Acc]
    atom_of_sig: dict
    rows_ok: np.ndarray          # bool over the kept test rows: rankers used
    k: int                       # vote K
    rrf_k: int
    backend: str | None
    threads: int | None
    train_ids: np.ndarray
    block_bytes: int
    vote_p: float
    correct_only: bool
    timing: dict = dataclasses.field(default_factory=lambda: {"aggregate_s": 0.0, "slabs": 0})


def influence(test: Any, train: Any, method: str = "graddot", how: str | Sequence[str] = ("rank",),
              groups: Any = ("all",), *, layers: Any = None, vote_p: float = 0.2, correct_only: bool = False,
              per_unit: bool = False, test_block: int | None = None, damping: Any = None,
              rank: int | None = None, checkpoints: Sequence[tuple[Any, Any, float]] | None = None,
              curvature_options: dict | None = None, drop_nonfinite: bool = False, rrf_k: int = 60,
              block_bytes: int = DEFAULT_BLOCK_BYTES, precision: str = "float32", threads: int | None = None,
              backend: str | None = None, progress: bool = False, out: str | Path | None = None) -> Aggregation:
    """Influence aggregated over units and tests in one pass, without writing per-unit scores.

    Returns the :class:`~fastinf.aggregation.aggregate.Aggregation` that
    ``aggregate_all(score(test, train, method, layers, ...), how, groups=groups, ...)`` returns
    (``.scores[(group, how)]`` = float64 [N], lowest = most detrimental); see the module docstring.

    Args:
        test, train: GradientStores or paths (same model, projection and units; checked first).
        method: one of :data:`FUSED_METHODS` (others: the two-stage ``fastinf.score`` + ``fastinf.aggregate``).
        how: one or more of :data:`FUSED_HOWS` (a name, ``"rank,vote"`` or a sequence).
        groups: unit groups as in ``aggregate_all`` (selectors, unit names / indices, or a mapping).
        layers: unit selector applied to the test store's units first (as in ``fastinf.score``).
        vote_p, correct_only, rrf_k: as in ``aggregate_all`` (``correct_only`` reads the test store's meta).
        per_unit: also one group per single unit (named after it; the layer plots), listed first.
        test_block: rows m of the m x N slab (default: ``fastinf.score``'s test block when the slab fits
            in ``block_bytes``, else the rows that fit).
        damping, rank, checkpoints, curvature_options, drop_nonfinite, block_bytes, precision: as in
            ``fastinf.score``. ``threads``: C++ rank threads; ``backend``: ``"cpp"`` / ``"numpy"``.
        progress: show a progress bar. out: also write the result as long-format Parquet (the file
            ``fastinf aggregate`` writes), atomically, after the pass.
    """
    run = _prepare(test, train, method, how, groups, layers=layers, vote_p=vote_p, correct_only=correct_only,
                   per_unit=per_unit, test_block=test_block, damping=damping, rank=rank,
                   checkpoints=checkpoints, curvature_options=curvature_options, drop=drop_nonfinite,
                   rrf_k=rrf_k, block_bytes=block_bytes, precision=precision, threads=threads,
                   backend=backend, out=out)
    t0 = time.perf_counter()
    plan = run.plan
    with _progress(_n_steps(plan, plan.terms[-1].train, block_bytes), progress, f"influence {method}") as bar:
        _score_pairwise(plan, _SlabSink(run), run.curv, block_bytes, bar)
    result = _result(run, method)
    result.meta["timing"] = {**run.timing, "wall_s": time.perf_counter() - t0}
    if out is not None:
        _write(result, out, run.train_ids, plan)
    return result


def _check_fused_options(method: str, hows: list[str], *, test_block: Any, out: Any, rrf_k: int,
                         threads: Any) -> None:
    """Refuse what fused mode cannot do, naming the two-stage path."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; fused influence supports {', '.join(FUSED_METHODS)}")
    if method not in FUSED_METHODS:
        raise ConfigError(f"method {method!r} is not one GEMM per unit and has no fused form; use the two-stage "
                          f"path: fastinf.aggregate(fastinf.score(test, train, {method!r}), ...)")
    if "median" in hows:
        raise ConfigError("how='median' cannot stream (it needs every ranker of a train sample at once); use the "
                          "two-stage path: fastinf.aggregate(fastinf.score(test, train, method), how='median')")
    if test_block is not None and (isinstance(test_block, bool) or not isinstance(test_block, int)
                                   or test_block < 1):
        raise ConfigError(f"test_block: expected a positive number of test rows, found {test_block!r}")
    if out is not None:
        from fastinf.aggregation.parquet import check_out_path

        if not str(out).endswith(".parquet"):
            raise ConfigError(f"out: expected a .parquet path, found {str(out)!r}")
        check_out_path(out, "out")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 0:
        raise ConfigError(f"rrf_k: expected a non-negative integer, found {rrf_k!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: expected a positive integer, found {threads!r}")


def _prepare(test: Any, train: Any, method: str, how: Any, groups: Any, *, layers: Any, vote_p: float,
             correct_only: bool, per_unit: bool, test_block: int | None, damping: Any, rank: int | None,
             checkpoints: Any, curvature_options: dict | None, drop: bool, rrf_k: int, block_bytes: int,
             precision: str, threads: int | None, backend: str | None, out: Any) -> _Run:
    """Validate everything (options, stores, groups, correctness flags) and lay out the run; no work yet."""
    from fastinf.aggregation._native import resolve_backend

    hows = _parse_hows(how)
    _check_fused_options(method, hows, test_block=test_block, out=out, rrf_k=rrf_k, threads=threads)
    _check_arguments(method, damping=damping, rank=rank, curvature=None, topk_tokens=None, topk_side="test",
                     checkpoints=checkpoints, block_bytes=block_bytes)
    resolve_backend(backend)
    vote_k(vote_p, 1)                                                   # validates vote_p
    dt = _dtype(precision)
    terms = _make_terms(method, _open(test), _open(train), checkpoints)
    setup = _setup_pairwise(method, terms, layers, drop)
    plan = _make_plan(method, setup, terms, block_bytes, dt, drop)
    test_s, train_s = terms[-1].test, terms[-1].train
    layout = _Layout(setup.units, int(plan.keep_test.sum()), int(plan.keep_train.sum()),
                     np.asarray(test_s.meta.correct, bool)[plan.keep_test])
    src = _Source(layout, None, None)
    group_idx = _groups(groups, src, per_unit)
    rows_ok = _test_rows(src, correct_only)
    member, atom_of_sig = _atoms(group_idx)
    used = sorted(member)
    hows_set = frozenset(hows)
    plan = dataclasses.replace(plan, units=[setup.units[i] for i in used],
                               test_rows=_slab_rows(plan.test_rows, test_block, layout.n_test, layout.n_train,
                                                    block_bytes))
    return _Run(plan=plan, curv=_curvature_kwargs(curvature_options, damping, rank), hows=hows,
                group_idx=group_idx, unit_names=layout.unit_names,
                atom_of_unit=[atom_of_sig[member[i]] for i in used],
                atoms=[_Acc(layout.n_train, hows_set) for _ in atom_of_sig], atom_of_sig=atom_of_sig,
                rows_ok=rows_ok, k=vote_k(vote_p, layout.n_train), rrf_k=rrf_k, backend=backend,
                threads=threads, train_ids=np.asarray(train_s.meta.ids)[plan.keep_train], block_bytes=block_bytes,
                vote_p=float(vote_p), correct_only=bool(correct_only))


def _groups(groups: Any, src: _Source, per_unit: bool) -> dict[str, list[int]]:
    """The groups, resolved as ``aggregate_all`` does; with ``per_unit`` one group per unit first."""
    if groups is None and not per_unit:
        return _resolve_groups(None, src)
    spec: dict[str, list[int]] = {}
    if per_unit:
        spec.update({name: [i] for i, name in enumerate(src.unit_names)})
    if groups is not None:
        spec.update(_resolve_groups(groups, src))
    return spec


def _slab_rows(two_stage_rows: int, test_block: int | None, m: int, n: int, budget: int) -> int:
    """Rows of the m x N slab: ``test_block``; else the two-stage test block if its slab fits in
    ``budget``; else the rows that fit, evened out over the blocks (no small last block)."""
    if test_block is not None:
        return int(min(test_block, m))
    if two_stage_rows * n * 4 <= budget:
        return int(two_stage_rows)
    rows = max(1, budget // (4 * n))
    n_blocks = -(-m // rows)
    return int(-(-m // n_blocks))


class _Layout:
    """The shape of the score set the two-stage path would write (units, kept rows, test correctness):
    what ``aggregation.sources._Source`` reads to resolve groups and ``correct_only``; holds no scores."""

    def __init__(self, units: list, n_test: int, n_train: int, test_correct: np.ndarray) -> None:
        self.units = list(units)
        self.unit_names = [u.name for u in self.units]
        self.n_test, self.n_train = n_test, n_train
        self.test_correct = test_correct

    def unit_scores(self, name: str) -> np.ndarray:
        raise AssertionError("fused influence holds no per-unit scores")  # pragma: no cover


class _SlabSink:
    """Stands in for the ``ScoreSetWriter`` of ``_score_pairwise``: gathers the blocks of one (unit, test
    block) into an m x N float32 slab and, once all N columns are in, feeds the kept rows to the atom."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.n = run.atoms[0].n if run.atoms else 0
        self.slab = np.empty((run.plan.test_rows, self.n), np.float32)
        self.key: tuple[int, int] | None = None
        self.rows = self.filled = 0

    def is_done(self, ui: int, r0: int) -> bool:
        """Nothing is resumed: every (unit, test block) is computed."""
        return False

    def mark_done(self, ui: int, r0: int) -> None:
        """A finished (unit, test block) was already fed to its atom in ``write``."""

    def write(self, ui: int, m0: int, n0: int, block: np.ndarray) -> None:
        """Place ``block`` (rows = the test block's kept rows, columns from output column ``n0``)."""
        if (ui, m0) != self.key:
            self.key, self.rows, self.filled = (ui, m0), block.shape[0], 0
        w = block.shape[1]
        self.slab[:self.rows, n0:n0 + w] = block
        self.filled += w
        if self.filled == self.n:
            self._flush(ui, m0)
            self.key = None

    def _flush(self, ui: int, m0: int) -> None:
        """Rank the finished slab once and add its used rows to the unit's atom."""
        t0 = time.perf_counter()
        run = self.run
        ok = run.rows_ok[m0:m0 + self.rows]
        if ok.any():
            block = self.slab[:self.rows] if ok.all() else self.slab[:self.rows][ok]
            if not np.isfinite(block).all():
                raise NonFiniteError(f"scores of unit {run.plan.units[ui].name!r} hold NaN/inf (test block at "
                                     f"row {m0}); the features are finite, so the scores overflowed float32")
            acc = run.atoms[run.atom_of_unit[ui]]
            step = len(block) if "zmean" not in acc.hows else max(1, _ZMEAN_BYTES // (24 * self.n))
            for r in range(0, len(block), step):
                acc.add(block[r:r + step], run.k, run.rrf_k, run.backend, run.threads)
        run.timing["aggregate_s"] += time.perf_counter() - t0
        run.timing["slabs"] += 1


def _result(run: _Run, method: str) -> Aggregation:
    """Finish every (group, how) from its atoms, as ``aggregate_all`` does."""
    out: dict[tuple[str, str], np.ndarray] = {}
    n_rankers: dict[str, int] = {}
    n_rows = int(run.rows_ok.sum())
    for g, idx in run.group_idx.items():
        g_atoms = [run.atoms[i] for sig, i in run.atom_of_sig.items() if g in sig]
        n_rankers[g] = len(idx) * n_rows
        for h in run.hows:
            out[(g, h)] = _finish(h, g_atoms)
    plan = run.plan
    return Aggregation(
        scores=out, groups={g: [run.unit_names[i] for i in idx] for g, idx in run.group_idx.items()},
        n_rankers=n_rankers, n_train=run.atoms[0].n, vote_p=run.vote_p, vote_k=run.k,
        correct_only=run.correct_only,
        meta={"hows": run.hows, "rrf_k": run.rrf_k, "n_test": len(run.rows_ok), "n_test_used": n_rows,
              "fused": {"method": method, "test_block": plan.test_rows, "units_scored": len(plan.units),
                        "precision": str(plan.dtype).replace("torch.", ""), "block_bytes": run.block_bytes}})


def _write(result: Aggregation, out: str | Path, train_ids: np.ndarray, plan: _Plan) -> None:
    """The Parquet of ``fastinf aggregate`` (run timings left out of its metadata)."""
    from fastinf.aggregation.parquet import write_parquet

    meta = {k: v for k, v in result.meta.items() if k != "timing"}
    t = plan.terms[-1]
    write_parquet(dataclasses.replace(result, meta=meta), out, train_ids=train_ids,
                  source=f"fused {plan.method}: test={t.test.path} train={t.train.path}")
