"""Fused score -> aggregate: per-unit influence scores fed straight into the aggregation accumulators.

``fastinf.influence(test, train, method, how, groups)`` gives what the two-stage path
``fastinf.aggregate_all(fastinf.score(test, train, method), how, groups=groups)`` gives, without writing
(or holding) the M x N x U score tensor. The test rows are cut into ``fastinf.score``'s test blocks of m
rows, and runs of consecutive blocks whose m x N slabs fit in ``slab_bytes`` form a *set*; per set and unit
(a *task*, :mod:`~fastinf.scoring.fused_loop`) the train blocks stream once, each decoded once and
multiplied (one GEMM per test block, with ``fastinf.score``'s preconditioning, sign, shapes and float32
values) into the set's slabs; each slab is ranked once (the C++ path of :mod:`fastinf.aggregation._native`)
and added to the accumulator of the unit's *atom* (the units sharing the same group memberships), so every
group and every ``how`` costs one pass. Memory is O(set x m x N) plus the accumulators, independent of M
and of the number of units; units in no group are not scored at all.

Around the pass: per-test top-k proponents / opponents per group from the same slabs
(:mod:`~fastinf.scoring.fused_topk`), a crash-safe resumable state beside ``out``
(:mod:`~fastinf.scoring.fused_state`), and tasks split over ``torchrun`` ranks with the float sums
combined in task order, so that any number of processes gives the one-process bits
(:mod:`~fastinf.scoring.fused_dist`)::

    torchrun --nproc-per-node 4 -m fastinf score --train T --test Q --method datainf \\
        --aggregate rank,vote --groups middle,all --out agg.parquet

Equality with the two-stage path: with the same ``block_bytes``, the test blocks are the ones
``fastinf.score`` uses whenever that m x N slab fits in ``block_bytes`` (at the defaults, k = 256 and
M = 1000: N up to ~67k), or when ``test_block`` equals the two-stage block; the scores are then
bit-identical, so the rank / vote / min-rank sums are identical integers and mean / zmean / rrf agree to
float64 rounding. With other blocks (a smaller slab at large N) the BLAS (MKL) may round some scores
differently in the last bit: its result for a row depends on how many rows the GEMM has.

``median`` cannot stream over rankers (it needs every ranker of a train sample at once) and is refused,
as are the methods that are not one GEMM per unit (selfinf, loss, repsim, tracin_we): use the two-stage
path for those. ``kfac`` (a dot product of kfac-projected features) and ``ekfac`` (a diagonal EK-FAC solve on
eigenbasis (pca) stores) are one GEMM per unit and fuse like the others. ``correct_only`` scores every test row (as the two-stage path does) and feeds only the
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
from fastinf.errors import ConfigError
from fastinf.scoring.curvature import check_method_projection
from fastinf.scoring.estimators import (
    METHODS,
    _check_arguments,
    _curvature_kwargs,
    _make_plan,
    _make_terms,
    _open,
    _progress,
)
from fastinf.scoring.fused_dist import Dist, combine_round, context, finish_integers, gather_objects
from fastinf.scoring.fused_loop import Buffers, fit_all, make_tasks, run_task
from fastinf.scoring.fused_state import load_state, prepare_state, request_key, save_state, state_path
from fastinf.scoring.fused_topk import TopK, check_topk, merge_rows, write_topk
from fastinf.scoring.pairwise import _score_pairwise
from fastinf.scoring.planning import DEFAULT_BLOCK_BYTES, _dtype, _n_steps, _Plan
from fastinf.scoring.setups import _setup_pairwise

__all__ = ["influence", "FUSED_METHODS", "FUSED_HOWS"]

FUSED_METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa", "kfac", "ekfac")
FUSED_HOWS = ("mean", "rank", "vote", "min_rank", "rrf", "zmean")
_TWO_STAGE_LOOP = _score_pairwise  # fastinf.score's loop: the fused pass keeps its GEMM shapes
DEFAULT_SLAB_BYTES = 1 << 30   # the slabs of one test-block set (a train block is read once per set)


@dataclasses.dataclass
class _Run:
    """Everything a fused run needs, checked before any work: the plan and the aggregation layout."""

    plan: _Plan
    curv: dict
    hows: list[str]
    group_idx: dict[str, list[int]]
    unit_names: list[str]
    used: list[int]              # plan unit index -> index into unit_names
    atom_of_unit: list[int]      # plan unit index -> atom index
    atoms: list[_Acc]
    atom_of_sig: dict
    rows_ok: np.ndarray          # bool over the kept test rows: rankers used
    k: int                       # vote K
    rrf_k: int
    backend: str | None
    threads: int | None
    train_ids: np.ndarray
    test_ids: np.ndarray
    block_bytes: int
    vote_p: float
    correct_only: bool
    set_blocks: int = 1          # test blocks per task (their slabs share one train stream)
    topk: Any = None             # the top-k k, or None
    timing: dict = dataclasses.field(default_factory=lambda: {"aggregate_s": 0.0, "slabs": 0})


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """Where the results go and how the run is committed (all optional)."""

    out: Path | None = None
    top_k_out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    commit_s: float = 600.0


def influence(test: Any, train: Any, method: str = "graddot", how: str | Sequence[str] = ("rank",),
              groups: Any = ("all",), *, layers: Any = None, vote_p: float = 0.2, correct_only: bool = False,
              per_unit: bool = False, test_block: int | None = None, damping: Any = None,
              rank: int | None = None, checkpoints: Sequence[tuple[Any, Any, float]] | None = None,
              curvature_options: dict | None = None, drop_nonfinite: bool = False, rrf_k: int = 60,
              block_bytes: int = DEFAULT_BLOCK_BYTES, slab_bytes: int = DEFAULT_SLAB_BYTES,
              precision: str = "float32", threads: int | None = None, backend: str | None = None,
              progress: bool = False, out: str | Path | None = None, top_k: int = 100,
              top_k_out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
              commit_s: float = 600.0, distributed: bool | None = None) -> Aggregation:
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
        slab_bytes: memory of the slabs of one test-block set: each train block is read once per set.
        damping, rank, checkpoints, curvature_options, drop_nonfinite, block_bytes, precision: as in
            ``fastinf.score``. ``threads``: C++ rank threads; ``backend``: ``"cpp"`` / ``"numpy"``.
        progress: show a progress bar. out: also write the result as long-format Parquet (the file
            ``fastinf aggregate`` writes), atomically, after the pass.
        top_k_out, top_k: also write per-test top-k proponents / opponents per group (k <= 1000) as Parquet
            (:mod:`~fastinf.scoring.fused_topk`).
        resume, overwrite, commit_s: with ``out``, the state is committed beside it every ``commit_s``
            seconds (:mod:`~fastinf.scoring.fused_state`); ``resume`` continues an interrupted run,
            ``overwrite`` discards its state.
        distributed: under ``torchrun``, split the tasks over the ranks (None: when launched so); the
            result is the one-process result bit for bit (:mod:`~fastinf.scoring.fused_dist`).
    """
    outputs = _outputs(out, top_k_out, resume, overwrite, commit_s)
    run = _prepare(test, train, method, how, groups, layers=layers, vote_p=vote_p, correct_only=correct_only,
                   per_unit=per_unit, test_block=test_block, damping=damping, rank=rank,
                   checkpoints=checkpoints, curvature_options=curvature_options, drop=drop_nonfinite,
                   rrf_k=rrf_k, block_bytes=block_bytes, slab_bytes=slab_bytes, precision=precision,
                   threads=threads, backend=backend, out=out, top_k=top_k if top_k_out is not None else None,
                   top_k_out=top_k_out)
    ctx = context(distributed)
    if ctx.world > 1 and resume:
        raise ConfigError("resume: a distributed fused run is not resumable; rerun it (or resume in one process)")
    if outputs.out is not None and ctx.world == 1:
        prepare_state(state_path(outputs.out), resume, overwrite)
    key = _state_key(run, method, layers, damping, rank, curvature_options, drop_nonfinite, precision)
    t0 = time.perf_counter()
    with _progress(_n_steps(run.plan, run.plan.terms[-1].train, block_bytes), progress and ctx.rank == 0,
                   f"influence {method}") as bar:
        topk_rows = _pass(run, ctx, bar, outputs, key)
    result = _result(run, method)
    result.meta["timing"] = {**run.timing, "wall_s": time.perf_counter() - t0, "world": ctx.world,
                             "rank": ctx.rank}
    if ctx.rank == 0:
        _write_outputs(result, run, outputs, topk_rows)
    ctx.barrier()
    return result


def _outputs(out: Any, top_k_out: Any, resume: Any, overwrite: Any, commit_s: Any) -> _Outputs:
    """Check the output arguments (types only; paths are checked in :func:`_prepare`)."""
    for name, v in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"{name}: expected True or False, found {v!r}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the interrupted run or start over")
    if resume and out is None:
        raise ConfigError("resume=True needs out= (the state of an interrupted run is kept beside its output)")
    if isinstance(commit_s, bool) or not isinstance(commit_s, (int, float)) or not commit_s >= 0:
        raise ConfigError(f"commit_s: expected seconds >= 0, found {commit_s!r}")
    return _Outputs(None if out is None else Path(out), None if top_k_out is None else Path(top_k_out),
                    bool(resume), bool(overwrite), float(commit_s))


def _state_key(run: _Run, method: str, layers: Any, damping: Any, rank: Any, curv: Any, drop: bool,
               precision: str) -> str:
    """The request key of the resume state (see :func:`~fastinf.scoring.fused_state.request_key`)."""
    return request_key(run, {"method": method, "layers": layers, "damping": damping, "rank": rank,
                             "curvature_options": curv, "drop": drop, "precision": precision,
                             "block_bytes": run.block_bytes, "vote_p": run.vote_p, "rrf_k": run.rrf_k,
                             "correct_only": run.correct_only, "top_k": run.topk})


def _pass(run: _Run, ctx: Dist, bar: Any, outputs: _Outputs, key: str) -> list | None:
    """Run the tasks in rounds of ``world`` (this rank's task of each round), combining after each round;
    with an output file (one process), commit the state after finished tasks. Returns the top-k rows."""
    tasks = make_tasks(run)
    spath = None if outputs.out is None or ctx.world > 1 else state_path(outputs.out)
    done, rows = (load_state(spath, key, run) if outputs.resume and spath is not None and spath.exists()
                  else (0, None))
    topk = None if run.topk is None else TopK(run, run.topk, _plan_groups(run))
    if topk is not None and rows is not None:
        topk.rows = rows
    if ctx.world > 1 and ctx.rank == 0:
        fit_all(run)
    ctx.barrier()
    bufs, last = Buffers(run), time.monotonic()
    for j0 in range(done, len(tasks), ctx.world):
        batch = tasks[j0:j0 + ctx.world]
        mine = None
        if ctx.rank < len(batch):
            if topk is not None:
                topk.start(batch[ctx.rank])
            mine = run_task(run, batch[ctx.rank], bufs, bar, topk)
            if topk is not None:
                topk.finish()
        combine_round(run, ctx, batch, mine)
        if spath is not None and j0 + len(batch) < len(tasks) and time.monotonic() - last >= outputs.commit_s:
            save_state(spath, key, j0 + len(batch), run, None if topk is None else topk.rows)
            last = time.monotonic()
    finish_integers(run, ctx)
    return None if topk is None else gather_objects(topk.rows, ctx, merge_rows)


def _plan_groups(run: _Run) -> dict[str, list[int]]:
    """The groups as plan unit indices (the units the pass scores)."""
    pos = {u: i for i, u in enumerate(run.used)}
    return {g: [pos[u] for u in idx] for g, idx in run.group_idx.items()}


def _write_outputs(result: Aggregation, run: _Run, outputs: _Outputs, topk_rows: list | None) -> None:
    """The aggregate Parquet, the top-k Parquet, then the resume state is no longer needed."""
    if outputs.top_k_out is not None:
        write_topk(topk_rows or [], outputs.top_k_out, run.test_ids, run.train_ids, list(run.group_idx))
    if outputs.out is not None:
        _write(result, outputs.out, run.train_ids, run.plan)
        state_path(outputs.out).unlink(missing_ok=True)


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
             slab_bytes: int, precision: str, threads: int | None, backend: str | None, out: Any,
             top_k: int | None, top_k_out: Any = None) -> _Run:
    """Validate everything (options, stores, groups, correctness flags) and lay out the run; no work yet."""
    from fastinf.aggregation._native import resolve_backend

    hows = _parse_hows(how)
    _check_fused_options(method, hows, test_block=test_block, out=out, rrf_k=rrf_k, threads=threads)
    if isinstance(slab_bytes, bool) or not isinstance(slab_bytes, int) or slab_bytes < 1:
        raise ConfigError(f"slab_bytes: expected a positive number of bytes, found {slab_bytes!r}")
    check_topk(top_k, top_k_out, out)
    _check_arguments(method, damping=damping, rank=rank, curvature=None, topk_tokens=None, topk_side="test",
                     checkpoints=checkpoints, block_bytes=block_bytes)
    resolve_backend(backend)
    vote_k(vote_p, 1)                                                   # validates vote_p
    terms = _make_terms(method, _open(test), _open(train), checkpoints)
    check_method_projection(method, *(s for t in terms for s in (t.test, t.train)))   # kfac / ekfac stores
    setup = _setup_pairwise(method, terms, layers, drop)
    plan = _make_plan(method, setup, terms, block_bytes, _dtype(precision), drop)
    test_s, train_s = terms[-1].test, terms[-1].train
    layout = _Layout(setup.units, int(plan.keep_test.sum()), int(plan.keep_train.sum()),
                     np.asarray(test_s.meta.correct, bool)[plan.keep_test])
    src = _Source(layout, None, None)
    group_idx = _groups(groups, src, per_unit)
    rows_ok = _test_rows(src, correct_only)
    member, atom_of_sig = _atoms(group_idx)
    used = sorted(member)
    rows = _slab_rows(plan.test_rows, test_block, layout.n_test, layout.n_train, block_bytes)
    plan = dataclasses.replace(plan, units=[setup.units[i] for i in used], test_rows=rows)
    per_block = rows * layout.n_train * 4 * (1 + (len(group_idx) if top_k is not None else 0))
    return _Run(plan=plan, curv=_curvature_kwargs(curvature_options, damping, rank), hows=hows,
                group_idx=group_idx, unit_names=layout.unit_names, used=used,
                atom_of_unit=[atom_of_sig[member[i]] for i in used],
                atoms=[_Acc(layout.n_train, frozenset(hows)) for _ in atom_of_sig], atom_of_sig=atom_of_sig,
                rows_ok=rows_ok, k=vote_k(vote_p, layout.n_train), rrf_k=rrf_k, backend=backend,
                threads=threads, train_ids=np.asarray(train_s.meta.ids)[plan.keep_train],
                test_ids=np.asarray(test_s.meta.ids)[plan.keep_test], block_bytes=block_bytes,
                vote_p=float(vote_p), correct_only=bool(correct_only),
                set_blocks=max(1, slab_bytes // max(1, per_block)), topk=top_k)


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
                        "set_blocks": run.set_blocks,
                        "precision": str(plan.dtype).replace("torch.", ""), "block_bytes": run.block_bytes}})


def _write(result: Aggregation, out: str | Path, train_ids: np.ndarray, plan: _Plan) -> None:
    """The Parquet of ``fastinf aggregate`` (run timings left out of its metadata)."""
    from fastinf.aggregation.parquet import write_parquet

    meta = {k: v for k, v in result.meta.items() if k != "timing"}
    t = plan.terms[-1]
    write_parquet(dataclasses.replace(result, meta=meta), out, train_ids=train_ids,
                  source=f"fused {plan.method}: test={t.test.path} train={t.train.path}")
