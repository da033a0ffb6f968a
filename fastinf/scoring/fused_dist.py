"""Fused influence over several processes (``torchrun``): tasks round-robin over ranks, sums combined exactly.

Task ``t`` runs on rank ``t % world``; the tasks run in *rounds* of ``world`` (round ``j`` = tasks
``j*world .. j*world + world - 1``). Integer sums (doubled rank / vote sums, min-ranks) go into each rank's
own accumulators and are summed (minimum for min-rank) across ranks once at the end: exact in any order.
Float sums (mean, zmean, rrf) are order-sensitive, so every task's float partials are gathered after its
round and added to the atoms in task order, on every rank, by the same code that a single process runs
(there the gather is the identity). A run on W processes therefore gives the bits of a run on one process
(at the same intra-op thread count: BLAS results depend on it). Memory of the gather: ``world`` x (atoms
of one task) x (float hows) x N float64 per round.

Every rank reads the whole train store (a shared file system); rank 0 fits the preconditioners first (so
no two ranks write one cache file) and alone writes the outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from fastinf.scoring.fused_loop import Task, item_fields, task_atoms, task_rankers

__all__ = ["Dist", "context", "combine_round", "finish_integers", "gather_objects"]


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` (world 1: no process group)."""

    rank: int = 0
    world: int = 1

    def owns(self, task: Task) -> bool:
        return task.index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def context(distributed: bool | None) -> Dist:
    """The process group of a ``torchrun`` launch (``distributed=None``: use one if launched so; False: never)."""
    if distributed is False:
        return Dist()
    from fastinf.distributed import init_from_env

    if not init_from_env():
        return Dist()
    import torch.distributed as dist

    return Dist(dist.get_rank(), dist.get_world_size())


def combine_round(run: Any, ctx: Dist, tasks: list[Task], mine: dict[int, Any] | None) -> None:
    """Add the float partials of one round's tasks (``tasks[i]`` ran on rank ``i``) to the atoms, in task
    order, and count their rankers. ``mine``: this rank's item accumulators (atom -> ``_Acc``) or None."""
    fields = item_fields(run)
    if ctx.world == 1:
        parts = [_pack(run, tasks[0], mine, fields)] if tasks else []
    else:
        parts = _all_gather(_pack(run, tasks[ctx.rank] if ctx.rank < len(tasks) else tasks[0],
                                  mine if ctx.rank < len(tasks) else None, fields), ctx)
    for task, part in zip(tasks, parts):
        for slot, atom in enumerate(task_atoms(run, task)):
            acc = run.atoms[atom]
            for f, name in enumerate(fields):
                getattr(acc, name)[:] += part[slot, f]
            acc.rankers += task_rankers(run, task, atom)


def _pack(run: Any, task: Task, items: dict[int, Any] | None, fields: list[str]) -> np.ndarray:
    """A task's float partials as one [atoms of the task, fields, N] float64 array (zeros when None)."""
    atoms = task_atoms(run, task)
    out = np.zeros((len(atoms), len(fields), run.atoms[0].n), np.float64)
    if items is not None:
        for slot, atom in enumerate(atoms):
            for f, name in enumerate(fields):
                out[slot, f] = getattr(items[atom], name)
    return out


def _all_gather(part: np.ndarray, ctx: Dist) -> list[np.ndarray]:
    """Every rank's array of this round, in rank order (gloo / NCCL all_gather)."""
    import torch
    import torch.distributed as dist

    if part.shape[1] == 0:
        return [part] * ctx.world
    t = torch.from_numpy(part)
    got = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(got, t)
    return [g.numpy() for g in got]


def finish_integers(run: Any, ctx: Dist) -> None:
    """Sum (min for min-rank) the integer accumulators of all ranks into every rank's atoms."""
    if ctx.world == 1:
        return
    import torch
    import torch.distributed as dist

    for acc in run.atoms:
        for name, op in (("rank2", dist.ReduceOp.SUM), ("vote2", dist.ReduceOp.SUM), ("min2", dist.ReduceOp.MIN)):
            arr = getattr(acc, name)
            if arr is not None:
                t = torch.from_numpy(arr)
                dist.all_reduce(t, op=op)


def gather_objects(obj: Any, ctx: Dist, merge: Callable[[list[Any]], Any]) -> Any:
    """``merge`` of every rank's ``obj`` (rank order), on every rank (small objects: top-k rows)."""
    if ctx.world == 1:
        return merge([obj])
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return merge(out)
