"""Sharded, resumable scoring: train blocks (column ranges of the M x N score matrices) split across ranks.

``score_distributed(test, train, method, out=...)`` computes the same per-unit scores as
``fastinf.score`` for the pairwise estimators (graddot, gradcos, if, datainf, lissa, kfac, ekfac), organised
for scale:

* **Sharding.** The kept train columns are cut into fixed blocks of ``block_size`` rows; block ``j`` of
  every unit belongs to rank ``j % world``. The split depends only on ``(N, block_size)``, never on the
  number of ranks, and every block is computed by the same code (float64 GEMM, float32 result), so a
  run on any number of ranks writes byte-identical score files.
* **One set of files.** Rank 0 preallocates the ScoreSet's memory-mapped per-unit arrays (and fits
  every unit's preconditioner once, cached next to the train store) before a barrier; each rank then
  writes its column ranges with ``os.pwrite``; after a final barrier rank 0 marks the manifest complete.
* **Crash safety and resume.** After a (unit, block) is written and fsynced, its rank appends one JSON
  line to ``progress/rank-<r>.jsonl``. A killed run leaves an incomplete score set (readers refuse
  it); ``resume=True`` recomputes exactly the unrecorded blocks, with any number of ranks, and the
  result equals an uninterrupted run byte for byte.

Launch on CPU or GPU with ``torchrun``::

    torchrun --nproc-per-node 4 -m fastinf.dist_score --test test_store --train train_store --out scores
    # across nodes: the same line on every node, plus
    #   --nnodes 2 --node-rank {0,1} --rdzv-backend c10d --rdzv-endpoint HOST0:29500
    # (the output directory must be on a file system all nodes share)

Memory per rank: one train block (store dtype, float32 and float64 copies), the float64 test features and
the ``M x block`` float64 product — see ``fastinf.plan`` (``block_size=None`` asks the planner).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastinf.errors import ConfigError, NonFiniteError, StoreError, StoreMismatchError
from fastinf.scoring.dist_output import (
    FORMAT,
    PROGRESS,
    _ColumnWriter,
    _finish,
    _prepare_output,
    _read_progress,
)
from fastinf.store import WriterLock, storage_error

__all__ = ["score_distributed", "train_blocks", "owner_of", "PAIRWISE_METHODS", "main"]

log = logging.getLogger(__name__)

PAIRWISE_METHODS = ("graddot", "gradcos", "if", "datainf", "lissa", "kfac", "ekfac")
# kfac: its inverse is folded into kfac-projected features (a plain dot product); ekfac: diagonal, pca stores
_CURVATURE = {"graddot": "identity", "gradcos": "identity", "if": "if", "datainf": "datainf", "lissa": "lissa",
              "kfac": "identity", "ekfac": "ekfac"}


def train_blocks(n_cols: int, block_size: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` of the fixed train blocks (the last one may be shorter)."""
    if block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    return [(c, min(n_cols, c + block_size)) for c in range(0, n_cols, block_size)]


def owner_of(block: int, world: int) -> int:
    """The rank that computes train block ``block`` (round-robin, so ranks get near-equal work)."""
    return block % world


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    barrier: Callable[[], None]


def _dist(shard: tuple[int, int] | None) -> _Dist:
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    barrier = dist.barrier if initialised else (lambda: None)
    if shard is not None:
        r, w = int(shard[0]), int(shard[1])
        if not 0 <= r < w:
            raise ConfigError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        return _Dist(r, w, barrier)
    if initialised:
        return _Dist(dist.get_rank(), dist.get_world_size(), barrier)
    return _Dist(0, 1, barrier)


def _keep_mask(store: Any, drop: bool, side: str) -> np.ndarray:
    """Rows to score: all, minus those the store recorded as NaN/inf (refused unless ``drop``)."""
    keep = np.ones(store.n, dtype=bool)
    bad = [int(d["row"]) for d in store.nonfinite]
    if bad:
        if not drop:
            ids = [int(d["id"]) for d in store.nonfinite[:20]]
            raise NonFiniteError(f"the {side} store {store.path} has {len(bad)} samples with NaN/inf features "
                                 f"(ids {ids}{' ...' if len(bad) > 20 else ''}); pass drop_nonfinite=True "
                                 "(--drop-nonfinite) to leave them out")
        keep[bad] = False
    if not keep.any():
        raise StoreError(f"no {side} sample is left after dropping samples with NaN/inf features")
    return keep


def _identity(method: str, units: Sequence[Any], test: Any, train: Any, block_size: int,
              curvature: dict, keep_test: np.ndarray, keep_train: np.ndarray) -> dict:
    """What makes two runs the same computation (checked on resume)."""
    return {"format": FORMAT, "method": method, "units": [u.name for u in units], "block_size": int(block_size),
            "curvature": {k: str(v) for k, v in sorted(curvature.items())},
            "test": test.fingerprint, "train": train.fingerprint,
            "n_test": int(keep_test.sum()), "n_train": int(keep_train.sum())}


def _queries(method: str, q: np.ndarray, precond: Any) -> torch.Tensor:
    """Test side ``Q H⁻¹`` (float64), rows L2-normalised first for gradcos."""
    t = torch.from_numpy(np.asarray(q, dtype=np.float64))
    if method == "gradcos":
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return t if precond is None else torch.as_tensor(precond.apply(t), dtype=torch.float64)


def _keys(method: str, g: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(g, dtype=np.float64))
    if method == "gradcos":
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return t


def score_distributed(test_store: Any, train_store: Any, method: str = "graddot", layers: Any = None, *,
                      out: str | os.PathLike, block_size: int | None = None, resume: bool = False,
                      overwrite: bool = False, damping: Any = None, rank: int | None = None,
                      drop_nonfinite: bool = False, test_block_rows: int = 4096,
                      device_memory: int | str | None = None, shard: tuple[int, int] | None = None,
                      progress: bool = False) -> Any:
    """Score ``test_store`` x ``train_store`` per unit into the ScoreSet at ``out``, sharded over ranks.

    Args:
        test_store, train_store: GradientStores (or paths) from the same model, projection and units.
        method: graddot | gradcos | if | datainf | lissa | kfac | ekfac (same scores as ``fastinf.score``;
            float64 GEMM; kfac needs kfac stores, ekfac pca stores).
        layers: unit selector applied to the test store's units (None: all).
        out: the score-set directory (on a file system every rank can reach).
        block_size: train rows per block (the unit of sharding and of resume); None: the largest safe
            block from ``fastinf.plan.auto_block_size`` (at most 65536), the same on every rank.
        resume: continue an interrupted run in ``out``. overwrite: replace what is in ``out``.
        damping, rank: curvature options (``rank`` = low-rank IF rank), as in ``fastinf.score``.
        drop_nonfinite: leave out samples the stores recorded as NaN/inf instead of refusing.
        shard: ``(rank, world)`` of this process; default from torch.distributed (else ``(0, 1)``).
        progress: log a progress bar on rank 0.
    Returns:
        The finished ScoreSet (every rank returns it after the final barrier).
    """
    from fastinf.scoring.scores import ScoreSet

    if method not in PAIRWISE_METHODS:
        raise ConfigError(f"distributed scoring supports {', '.join(PAIRWISE_METHODS)}; got {method!r} "
                          "(score the others with fastinf.score in one process)")
    d = _dist(shard)
    test, train = _open_store(test_store), _open_store(train_store)
    from fastinf.scoring.curvature import check_method_projection

    check_method_projection(method, test, train)
    if method == "kfac" and (damping is not None or rank is not None):
        raise ConfigError("damping/rank do not apply to kfac (no curvature solve: its damping is part of the kfac "
                          "projection); drop them")
    units = _select_units(test, train, layers)
    keep_test = _keep_mask(test, drop_nonfinite, "test")
    keep_train = _keep_mask(train, drop_nonfinite, "train")
    n_cols, n_rows = int(keep_train.sum()), int(keep_test.sum())
    curv = _curvature_kwargs(damping, rank)
    if block_size is None:
        block_size = _auto_block_size(train, units, min(n_rows, test_block_rows), n_cols, device_memory)
    blocks = train_blocks(n_cols, int(block_size))
    ident = _identity(method, units, test, train, int(block_size), curv, keep_test, keep_train)
    out = Path(out)

    # ---- rank 0: allocate (or validate for resume), fit preconditioners; then everyone opens the files
    if d.rank == 0:
        _prepare_output(out, ident, units, method, test, train, keep_test, keep_train, resume, overwrite)
        _fit_preconditioners(train, units, method, drop_nonfinite, curv)
    d.barrier()
    manifest = _read_manifest(out, ident, d.rank)
    if manifest.get("complete"):
        d.barrier()
        return ScoreSet.open(out)
    _score_mine(out, manifest, d, units, blocks, test, train, method, keep_test, keep_train, curv,
                drop_nonfinite, test_block_rows, progress)
    d.barrier()
    if d.rank == 0:
        _finish(out, len(units), len(blocks))
    d.barrier()
    return ScoreSet.open(out)


def _open_store(store: Any) -> Any:
    """A GradientStore from a store object or a path."""
    from fastinf.store import GradientStore

    return GradientStore.open(store) if isinstance(store, (str, os.PathLike)) else store


def _select_units(test: Any, train: Any, layers: Any) -> list:
    """The test store's units selected by ``layers``; the train store must hold them all, compatibly."""
    from fastinf.extraction.units import select

    units = select(test.units, layers) if layers is not None else list(test.units)
    missing = [u.name for u in units if u.name not in train.unit_names]
    if missing:
        raise StoreMismatchError(f"the train store {train.path} lacks unit(s) {missing[:6]} of the test store "
                                 f"{test.path}; extract both with the same --layers or pass layers=...")
    train.check_compatible(test, units=[u.name for u in units])
    return units


def _curvature_kwargs(damping: Any, rank: int | None) -> dict[str, Any]:
    """The ``fit_preconditioner`` arguments: ``damping`` and ``rank`` where given."""
    from fastinf.scoring.curvature import Damping

    curv: dict[str, Any] = {}
    if damping is not None:
        curv["damping"] = Damping.parse(damping)
    if rank is not None:
        curv["rank"] = int(rank)
    return curv


def _auto_block_size(train: Any, units: Sequence[Any], test_rows: int, n_cols: int,
                     device_memory: int | str | None) -> int:
    """The largest safe train block from the planner (the same on every rank)."""
    from fastinf.extraction.plan import auto_block_size

    return auto_block_size([train.feature_dim(u.name) for u in units], test_rows,
                           n=n_cols, dtype=train.dtype, device_memory=device_memory)


def _fit_preconditioners(train: Any, units: Sequence[Any], method: str, drop_nonfinite: bool, curv: dict) -> None:
    """Rank 0: fit (and cache next to the train store) every unit's preconditioner before the barrier."""
    from fastinf.scoring.curvature import fit_preconditioner

    if _CURVATURE[method] != "identity":
        for u in units:
            fit_preconditioner(train, u.name, _CURVATURE[method], drop_nonfinite=drop_nonfinite, **curv)


def _read_manifest(out: Path, ident: dict, rank: int) -> dict:
    """The manifest rank 0 prepared; refuse one of a different run."""
    from fastinf.scoring.score_files import read_manifest

    manifest = read_manifest(out)
    if manifest.get("params", {}).get("dist") != ident:
        raise StoreMismatchError(f"rank {rank}: {out} holds a different scoring run than rank 0 prepared")
    return manifest


def _score_mine(out: Path, manifest: dict, d: _Dist, units: Sequence[Any], blocks: Sequence[tuple[int, int]],
                test: Any, train: Any, method: str, keep_test: np.ndarray, keep_train: np.ndarray, curv: dict,
                drop_nonfinite: bool, test_block_rows: int, progress: bool) -> None:
    """Under this rank's writer lock: score the blocks it owns that no progress log records yet."""
    lock = WriterLock(out / "locks" / f"rank-{d.rank}.lock")   # a second writer of this rank is refused
    lock.acquire()
    try:
        done = _read_progress(out)
        mine = [(ui, j) for ui in range(len(units)) for j in range(len(blocks))
                if owner_of(j, d.world) == d.rank and (ui, j) not in done]
        t0 = time.perf_counter()
        _score_blocks(out, manifest["files"], d.rank, mine, units, blocks, test, train, method, keep_test,
                      keep_train, curv, drop_nonfinite, test_block_rows, progress and d.rank == 0)
    except OSError as e:
        raise storage_error(e, out, f"writing scores (rank {d.rank})") from e
    finally:
        lock.release()
    log.info("rank %d scored %d blocks in %.1fs", d.rank, len(mine), time.perf_counter() - t0)


def _score_blocks(out: Path, files: Sequence[str], rank: int, todo: Sequence[tuple[int, int]], units: Sequence[Any],
                  blocks: Sequence[tuple[int, int]], test: Any, train: Any, method: str, keep_test: np.ndarray,
                  keep_train: np.ndarray, curv: dict, drop_nonfinite: bool, test_block_rows: int,
                  progress: bool) -> None:
    """Compute and write the (unit, train block) pairs ``todo``; record each after it is on disk."""
    from tqdm.auto import tqdm

    from fastinf.scoring.curvature import fit_preconditioner

    n_rows = int(keep_test.sum())
    kept_rows = np.flatnonzero(keep_train)            # kept column c is train row kept_rows[c]
    writer = _ColumnWriter(out, files, n_rows, int(keep_train.sum()))
    (out / PROGRESS).mkdir(exist_ok=True)
    plog = open(out / PROGRESS / f"rank-{rank}.jsonl", "a")
    bar = tqdm(total=len(todo), disable=not progress, unit="block", dynamic_ncols=True, desc=f"score {method}")
    by_unit: dict[int, list[int]] = {}
    for ui, j in todo:
        by_unit.setdefault(ui, []).append(j)
    try:
        for ui, js in by_unit.items():
            name = units[ui].name
            pre = None
            if _CURVATURE[method] != "identity":   # fitted by rank 0 before the barrier: loaded from its cache
                pre = fit_preconditioner(train, name, _CURVATURE[method], drop_nonfinite=drop_nonfinite, **curv)
            qf = np.concatenate([b for _, b in test.iter_blocks(name, 65536)])[keep_test]
            qp = _queries(method, qf, pre)                                  # (M, k) float64, once per unit
            for j in js:
                c0, c1 = blocks[j]
                r0, r1 = int(kept_rows[c0]), int(kept_rows[c1 - 1]) + 1   # train rows spanning the block
                g = np.concatenate([b for _, b in train.iter_blocks(name, r1 - r0, start=r0, stop=r1)])
                keys = _keys(method, g[keep_train[r0:r1]])                  # (c1 - c0, k) float64
                for m0 in range(0, n_rows, test_block_rows):
                    s = (qp[m0:m0 + test_block_rows] @ keys.T).to(torch.float32).numpy()   # (m, c1 - c0)
                    writer.write(ui, m0, c0, s)
                writer.sync(ui)
                plog.write(json.dumps({"unit": ui, "block": j, "cols": [c0, c1], "rank": rank}) + "\n")
                plog.flush()
                os.fsync(plog.fileno())
                bar.update(1)
    finally:
        writer.close()
        plog.close()
        bar.close()


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m fastinf.dist_score --test T --train G --out S [...]``."""
    p = argparse.ArgumentParser(prog="python -m fastinf.dist_score",
                                description="Score a test store against a train store, sharding the train "
                                            "blocks across torchrun ranks (resumable).")
    p.add_argument("--test", required=True, help="test GradientStore")
    p.add_argument("--train", required=True, help="train GradientStore")
    p.add_argument("--out", required=True, help="output score-set directory (shared by all ranks)")
    p.add_argument("--method", default="graddot", choices=PAIRWISE_METHODS)
    p.add_argument("--layers", default=None, help="unit selector (default: all units of the test store)")
    p.add_argument("--block-size", type=int, default=None, help="train rows per block (default: from the plan)")
    p.add_argument("--damping", default=None, help="absolute (1e-3) or relative (rel:0.1) damping")
    p.add_argument("--rank", type=int, default=None, help="low-rank IF rank")
    p.add_argument("--drop-nonfinite", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import torch.distributed as dist

    from fastinf.distributed import init_from_env
    from fastinf.errors import FastinfError

    owns_group = not (dist.is_available() and dist.is_initialized()) and init_from_env()
    try:
        s = score_distributed(args.test, args.train, args.method, args.layers, out=args.out,
                              block_size=args.block_size, resume=args.resume, overwrite=args.overwrite,
                              damping=args.damping, rank=args.rank, drop_nonfinite=args.drop_nonfinite)
    except FastinfError as e:
        print(f"fastinf dist_score: error: {e}", file=sys.stderr)
        return 2
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"{s.path}: {len(s.unit_names)} units x {s.n_test} test x {s.n_train} train ({s.method})")
    if owns_group:
        dist.destroy_process_group()  # only a group this call created; a caller's group stays up
    return 0


if __name__ == "__main__":
    sys.exit(main())
