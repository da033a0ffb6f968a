"""The pass of fused influence: tasks of (test-block set, units), one train stream per task, slabs ranked once.

A *test-block set* is a run of consecutive test blocks (the two-stage path's blocks, so the GEMMs keep its
shapes) whose m x N slabs fit in ``slab_bytes`` together. A *task* is one set and one unit (or, when per-test
top-k lists are asked for, the set and every unit, so that a group's per-test sums stay in one place). A task
reads each train block of its unit(s) once, decodes it once and runs one GEMM per test block of the set into
that block's slab; each finished slab is ranked once and added to the task's *item* accumulator of the unit's
atom (integer sums go straight into the atom; float sums into fresh zero vectors). The item float sums are
added to the atoms task by task in task order (:mod:`~fastinf.scoring.fused_dist`), which is what makes the
result independent of how tasks are spread over processes, and of where a run was interrupted and resumed.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from fastinf.aggregation.accumulators import _Acc
from fastinf.errors import NonFiniteError
from fastinf.scoring.curvature import fit_preconditioner
from fastinf.scoring.pairwise import _CURVATURE, _block_queries, _prepare_keys
from fastinf.scoring.planning import _test_blocks, _train_block_rows
from fastinf.scoring.preconditioners import IdentityPreconditioner
from fastinf.scoring.setups import _raise_nonfinite
from fastinf.scoring.sources import to_tensor

__all__ = ["Task", "make_tasks", "run_task", "item_fields", "task_atoms", "task_rankers", "fit_all"]

_ZMEAN_BYTES = 64 << 20  # float64 temporaries of one zmean accumulation step
FLOAT_FIELDS = (("mean", "sum"), ("zmean", "zsum"), ("rrf", "rrf"))


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: the test blocks ``(r0, r1, keep)`` of a set and the plan units it scores."""

    index: int
    blocks: tuple
    units: tuple[int, ...]


def make_tasks(run: Any) -> list[Task]:
    """The tasks of a run, in their fixed order (set-major): test blocks that feed no ranker are skipped."""
    plan = run.plan
    blocks = [(r0, r1, keep) for r0, r1, keep in _test_blocks(plan)
              if keep.any() and run.rows_ok[_kept(plan, r0, keep)].any()]
    sets = [tuple(blocks[i:i + run.set_blocks]) for i in range(0, len(blocks), run.set_blocks)]
    units = tuple(range(len(plan.units)))
    tasks: list[Task] = []
    for s in sets:
        for group in ([units] if run.topk is not None else [(u,) for u in units]):
            tasks.append(Task(len(tasks), s, group))
    return tasks


def _kept(plan: Any, r0: int, keep: np.ndarray) -> slice:
    """The kept-row range (indices into ``rows_ok``) of the test block starting at row ``r0``."""
    m0 = plan.row_offset(r0)
    return slice(m0, m0 + int(keep.sum()))


def task_atoms(run: Any, task: Task) -> list[int]:
    """The atoms a task adds to, ascending (the slots of its item accumulators)."""
    return sorted({run.atom_of_unit[u] for u in task.units})


def task_rankers(run: Any, task: Task, atom: int) -> int:
    """Rankers a task adds to ``atom``: its used test rows times its units in that atom."""
    rows = sum(int(run.rows_ok[_kept(run.plan, r0, keep)].sum()) for r0, _, keep in task.blocks)
    return rows * sum(1 for u in task.units if run.atom_of_unit[u] == atom)


def item_fields(run: Any) -> list[str]:
    """The float accumulator fields (``_Acc`` attribute names) of the run's hows, in a fixed order."""
    return [f for h, f in FLOAT_FIELDS if h in run.hows]


def _item_acc(atom: _Acc) -> _Acc:
    """An accumulator sharing the atom's integer sums, with fresh zero float sums (a task's partial)."""
    it = _Acc(atom.n, frozenset())
    it.hows = atom.hows
    it.rank2, it.vote2, it.min2 = atom.rank2, atom.vote2, atom.min2
    for name in ("sum", "zsum", "rrf"):
        if getattr(atom, name) is not None:
            setattr(it, name, np.zeros(atom.n, np.float64))
    return it


def fit_all(run: Any) -> None:
    """Fit (and cache next to the train store) every scored unit's preconditioner: rank 0 does this before
    the others start, so that no two processes write the same cache file."""
    for u in run.plan.units:
        _preconditioners(run, u.name)


def _preconditioners(run: Any, name: str) -> list:
    """One preconditioner per term of unit ``name`` (identity for graddot / gradcos / tracin)."""
    plan = run.plan
    method = _CURVATURE[plan.method]
    if method == "identity":
        return [IdentityPreconditioner(plan.terms[0].train.feature_dim(name), t.train.n) for t in plan.terms]
    return [fit_preconditioner(t.train, name, method, drop_nonfinite=plan.drop, **run.curv) for t in plan.terms]


def run_task(run: Any, task: Task, bufs: "Buffers", bar: Any, topk: Any) -> dict[int, _Acc]:
    """Score and rank one task; returns its item accumulator per atom (integer sums already in the atoms)."""
    items: dict[int, _Acc] = {}
    for ui in task.units:
        atom = run.atom_of_unit[ui]
        it = items.get(atom) or items.setdefault(atom, _item_acc(run.atoms[atom]))
        for i, (m0, slab) in enumerate(_unit_slabs(run, ui, task.blocks, bufs, bar)):
            _feed(run, ui, m0, slab, it)
            if topk is not None:
                topk.add(ui, i, slab)
    return items


def _unit_slabs(run: Any, ui: int, blocks: tuple, bufs: "Buffers", bar: Any) -> list[tuple[int, np.ndarray]]:
    """The m x N score slabs of unit ``ui`` for every test block of a set: each train block is read and
    decoded once and multiplied with every test block (the two-stage GEMM shapes, so the same floats)."""
    plan = run.plan
    name = plan.units[ui].name
    names = [u.name for u in plan.units]
    k = plan.terms[0].train.feature_dim(name)
    pre = _preconditioners(run, name)
    qs = [_block_queries(plan, pre, name, names, r0, r1, keep) for r0, r1, keep in blocks]
    slabs = [(plan.row_offset(r0), bufs.slab(i, len(q[0]))) for i, ((r0, _, _), q) in enumerate(zip(blocks, qs))]
    nb = _train_block_rows(k, plan.test_rows, len(plan.terms), run.block_bytes)
    decode = bufs.decode(k, min(nb, plan.terms[0].train.n), len(plan.terms))
    streams = [t.train.iter_blocks(name, nb, out=d) for t, d in zip(plan.terms, decode)]
    for tblocks in zip(*streams):
        n0, b = tblocks[0][0], len(tblocks[0][1])
        gts = [_keys(run, t, g, names) for (_, g), t in zip(tblocks, plan.terms)]
        keep = plan.keep_train[n0:n0 + b]
        c0 = plan.col_offset(n0)
        for q, (_, slab) in zip(qs, slabs):
            out = bufs.out[:len(q[0]) * b].view(len(q[0]), b)                       # (m, b)
            for j, (qt, gt) in enumerate(zip(q, gts)):
                if j == 0:
                    torch.matmul(qt, gt, out=out)
                else:
                    out.addmm_(qt, gt)
            o = out.numpy() if keep.all() else out.numpy()[:, keep]
            slab[:, c0:c0 + o.shape[1]] = o
        bar.update(len(blocks))
    return slabs


def _keys(run: Any, term: Any, g: np.ndarray, names: list[str]) -> torch.Tensor:
    """One decoded train block as the (k, b) right-hand side of the GEMM (non-finite rows raise)."""
    plan = run.plan
    if not plan.drop and not np.isfinite(g).all():
        _raise_nonfinite(term.train, names, "train")
    return _prepare_keys(plan.method, to_tensor(g).to(plan.dtype)).T


def _feed(run: Any, ui: int, m0: int, slab: np.ndarray, it: _Acc) -> None:
    """Rank one finished slab once and add its used rows to the item accumulator."""
    t0 = time.perf_counter()
    ok = run.rows_ok[m0:m0 + len(slab)]
    if ok.any():
        block = slab if ok.all() else slab[ok]
        if not np.isfinite(block).all():
            raise NonFiniteError(f"scores of unit {run.plan.units[ui].name!r} hold NaN/inf (test block at row "
                                 f"{m0}); the features are finite, so the scores overflowed float32")
        step = len(block) if it.zsum is None else max(1, _ZMEAN_BYTES // (24 * it.n))
        for r in range(0, len(block), step):
            it.add(block[r:r + step], run.k, run.rrf_k, run.backend, run.threads)
    run.timing["aggregate_s"] += time.perf_counter() - t0
    run.timing["slabs"] += 1


class Buffers:
    """Reused memory of the pass: the slabs of one set, the GEMM output block and the decode buffers."""

    def __init__(self, run: Any) -> None:
        plan = run.plan
        n = run.atoms[0].n if run.atoms else 0
        self.n = n
        self._slabs: list[np.ndarray] = []
        self._decode: dict[tuple[int, int, int], list[np.ndarray]] = {}
        nb_max = max([_train_block_rows(plan.terms[0].train.feature_dim(u.name), plan.test_rows,
                                        len(plan.terms), run.block_bytes) for u in plan.units] or [1])
        self.out = torch.empty(plan.test_rows * min(nb_max, plan.terms[0].train.n), dtype=plan.dtype)

    def slab(self, i: int, rows: int) -> np.ndarray:
        """Slab ``i`` of the set (``rows`` x N float32), allocated on first use and reused after."""
        while len(self._slabs) <= i:
            self._slabs.append(np.empty((0, self.n), np.float32))
        if self._slabs[i].shape[0] < rows:
            self._slabs[i] = np.empty((rows, self.n), np.float32)
        return self._slabs[i][:rows]

    def decode(self, k: int, rows: int, terms: int) -> list[np.ndarray]:
        """Per-term float32 decode buffers for train blocks of ``rows`` x ``k`` (reused across units)."""
        key = (k, rows, terms)
        if key not in self._decode:
            self._decode = {key: [np.empty((rows, k), np.float32) for _ in range(terms)]}
        return self._decode[key]
