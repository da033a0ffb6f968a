"""Datamodel retrains: the ground truth of the linear datamodeling score (LDS).

``m`` subsets of the train set (each exactly ``round(alpha * N)`` samples; subset ``j`` is drawn from
``default_rng([seed, j])``, so a larger ``m`` keeps the first subsets), each fine-tuned from the same
initial checkpoint (the run's seed fixes the head / LoRA initialisation and the data order) with the
run's recipe (:func:`fastinf.experiment.train.finetune`, full or LoRA), then the margin of every test
sample under the final model (:mod:`.margins`; the final epoch is used, never a checkpoint chosen on
the test set whose outcome is being measured).

Directory (``out``)::

    datamodels.json   manifest: kind, recipe digest (model, train, data fingerprints, alpha, seed), m, N, M
    subsets.npy       bool [m, N] membership
    margins/<j>.npy   float64 [M]: subset j's margins, written atomically by whoever retrained it
    work/<j>/         a retrain in progress (removed when its margins are written)
    locks/            the writer lock (one process drives a directory at a time)

Resumable per subset: a rerun (after a kill, or with a larger ``m``) retrains only the subsets without
margins; a half-written ``work/<j>/`` is cleared and redone. Parallel: ``workers > 1`` runs the retrains
in a process pool (spawned processes, ``threads`` torch threads each), with a progress line and ETA per
finished subset. The result, :class:`GroundTruth`, is reusable for any number of estimators.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastinf.experiment.config import ModelConfig, TrainConfig
from fastinf.experiment.config_io import config_hash, to_dict
from fastinf.errors import ConfigError, DataError
from fastinf.store.lock import WriterLock
from fastinf.store.ownership import ArtifactKind, check_removable, make_output_dir, remove_own_artifact

__all__ = ["GroundTruth", "draw_subsets", "datamodels", "DATAMODELS_KIND"]

log = logging.getLogger(__name__)
MANIFEST = "datamodels.json"
_KIND = "fastinf datamodels"
DATAMODELS_KIND = ArtifactKind("fastinf datamodels directory", MANIFEST,
                               entries=lambda n: n in (MANIFEST, "subsets.npy", "margins", "work", "locks")
                               or bool(re.match(r"^\..*\.tmp$", n)), is_own=lambda m: m.get("kind") == _KIND)


def draw_subsets(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``m`` seeded subsets of ``range(n)``, each of exactly ``round(alpha * n)`` samples: bool [m, n]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"datamodels need at least 2 train samples, found {n!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 3:
        raise ConfigError(f"lds.m: expected an integer >= 3 subsets (LDS is a rank correlation over them), found {m!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"lds.alpha: expected a fraction in (0, 1), found {alpha!r} (0.5 = half the train set)")
    size = min(n - 1, max(1, int(np.floor(alpha * n + 0.5))))
    out = np.zeros((m, n), bool)
    for j in range(m):
        out[j, np.random.default_rng([int(seed), j]).choice(n, size, replace=False)] = True
    return out


@dataclass
class GroundTruth:
    """Subsets and the margins of every test sample under the model retrained on each (complete rows only)."""

    path: Path
    subsets: np.ndarray       # bool [m, N]
    margins: np.ndarray       # float64 [m, M]
    manifest: dict[str, Any]

    @property
    def m(self) -> int:
        return int(self.subsets.shape[0])

    @classmethod
    def open(cls, path: str | Path, *, partial: bool = False) -> "GroundTruth":
        """Read a datamodels directory; every subset must have its margins unless ``partial`` (then only
        the finished subsets are returned)."""
        p = Path(path)
        man = _read_manifest(p)
        if man is None:
            raise ConfigError(f"{p}: no {MANIFEST}; not a datamodels directory (run `fastinf lds` first)")
        subsets = np.load(p / "subsets.npy", allow_pickle=False)
        done = [j for j in range(subsets.shape[0]) if (p / "margins" / f"{j}.npy").is_file()]
        if not partial and len(done) < subsets.shape[0]:
            raise DataError(f"{p}: {subsets.shape[0] - len(done)} of {subsets.shape[0]} subsets have not been "
                            "retrained yet; resume with `fastinf lds` (or open with partial=True)")
        margins = np.stack([np.load(p / "margins" / f"{j}.npy", allow_pickle=False) for j in done]) if done else \
            np.zeros((0, int(man["n_test"])))
        if margins.shape[1:] != (int(man["n_test"]),):
            raise ConfigError(f"{p}: margins of shape {margins.shape}, expected {man['n_test']} per subset; damaged")
        return cls(p, subsets[done], margins, man)


def _read_manifest(p: Path) -> dict[str, Any] | None:
    try:
        man = json.loads((p / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}/{MANIFEST}: cannot read it ({e}); it is damaged — rerun with overwrite") from None
    if not isinstance(man, dict) or man.get("kind") != _KIND:
        raise ConfigError(f"{p}/{MANIFEST} is not a fastinf datamodels manifest")
    return man


def _recipe(model_cfg: ModelConfig, train_cfg: TrainConfig, train: Any, test: Any, alpha: float, seed: int,
            train_seed: int, n_classes: int) -> str:
    """The digest of everything the margins depend on (so a changed recipe is never mixed in)."""
    return config_hash({"model": to_dict(model_cfg), "train": to_dict(train_cfg), "train_fp": train.fingerprint(),
                        "test_fp": test.fingerprint(), "alpha": float(alpha), "seed": int(seed),
                        "train_seed": int(train_seed), "n_classes": int(n_classes),
                        "margin": "z_y - logsumexp(z_other)"}, length=64)


def _prepare(out: Path, recipe: str, overwrite: bool) -> None:
    """Refuse a foreign directory or another recipe's datamodels (unless ``overwrite``, which clears ours)."""
    if out.exists() and (not out.is_dir() or any(e.name != "locks" for e in out.iterdir())):
        man = _read_manifest(out) if out.is_dir() else None
        if man is None:
            check_removable(out, DATAMODELS_KIND, what="writing")     # raises naming what is there
        elif man.get("recipe") != recipe:
            if not overwrite:
                raise ConfigError(f"{out} holds datamodels of another recipe (model, training, data, alpha or "
                                  "seed changed); pass overwrite=True (--overwrite) to retrain from scratch")
            remove_own_artifact(out, DATAMODELS_KIND)
        elif overwrite:
            remove_own_artifact(out, DATAMODELS_KIND)
        else:
            check_removable(out, DATAMODELS_KIND, what="writing")     # our own: only our entries inside
    make_output_dir(out)


def _write_setup(out: Path, recipe: str, subsets: np.ndarray, n_test: int, extra: dict[str, Any]) -> None:
    """The manifest and the subset masks (rewritten when ``m`` grows; the first rows never change)."""
    old = np.load(out / "subsets.npy", allow_pickle=False) if (out / "subsets.npy").is_file() else None
    if old is not None and not np.array_equal(old[: min(len(old), len(subsets))], subsets[: len(old)]):
        raise ConfigError(f"{out}: its subsets differ from the ones this seed draws; it is damaged — overwrite it")
    if old is None or len(old) < len(subsets):
        tmp = out / ".subsets.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, subsets)
        tmp.replace(out / "subsets.npy")
    man = {"kind": _KIND, "format": 1, "recipe": recipe, "m": int(max(len(subsets), 0 if old is None else len(old))),
           "n_train": int(subsets.shape[1]), "n_test": int(n_test), **extra}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(man, indent=1) + "\n")
    tmp.replace(out / MANIFEST)


@dataclass
class _Job:
    """One retrain, everything a spawned worker needs (picklable)."""

    j: int
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    train: Any
    test: Any
    n_classes: int
    seed: int
    work: str
    dest: str
    threads: int


def _retrain(job: _Job) -> tuple[int, float]:
    """Fine-tune on one subset, record the test margins atomically, drop the checkpoints; (j, seconds)."""
    import torch

    from fastinf.experiment.margins import margins_of
    from fastinf.experiment.train import finetune, load_checkpoint

    t0 = time.perf_counter()
    old = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        work = Path(job.work)
        if work.exists():
            shutil.rmtree(work)                     # a retrain killed half-way: start it again
        res = finetune(job.model_cfg, job.train_cfg, job.train, None, work, seed=job.seed, n_classes=job.n_classes)
        model, tok = load_checkpoint(res.checkpoints[-1].path)
        y = margins_of(model, tok, job.test, max_length=job.model_cfg.max_length)
        dest = Path(job.dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, y.astype(np.float64))
        tmp.replace(dest)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        torch.set_num_threads(old)
    return job.j, time.perf_counter() - t0


def datamodels(model_cfg: ModelConfig, train_cfg: TrainConfig, train: Any, test: Any, out: str | Path, *,
               m: int = 64, alpha: float = 0.5, seed: int = 0, train_seed: int | None = None, workers: int = 1,
               threads: int | None = None,
               n_classes: int | None = None, overwrite: bool = False, progress: bool = False,
               echo: Callable[[str], None] | None = None) -> GroundTruth:
    """Retrain on ``m`` subsets (resuming finished ones) and return the ground truth; see the module docstring.

    Args:
        model_cfg, train_cfg: the run's model and fine-tuning recipe (LoRA or full).
        train, test: text datasets (the train set influence was estimated on; the test samples scored).
        out: the datamodels directory. m, alpha, seed: how many subsets, their fraction, their seed.
        train_seed: the fine-tune seed (default ``seed``): the same for every subset, so every retrain starts
            from the same initial checkpoint (head / LoRA initialisation) as the run's model of that seed.
        workers: parallel retrain processes; threads: torch threads each (default: CPUs // workers).
    """
    out = Path(out)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"lds.workers: expected a positive integer, found {workers!r}")
    subsets = draw_subsets(len(train), m, alpha, seed)
    n_classes = int(n_classes or max(int(np.max(train.labels)), int(np.max(test.labels))) + 1)
    train_seed = seed if train_seed is None else train_seed
    recipe = _recipe(model_cfg, train_cfg, train, test, alpha, seed, train_seed, n_classes)
    _prepare(out, recipe, overwrite)
    lock = WriterLock(out / "locks" / "datamodels.lock")
    lock.acquire()
    try:
        _write_setup(out, recipe, subsets, len(test), {"alpha": float(alpha), "seed": int(seed),
                                                         "train_seed": int(train_seed)})
        (out / "margins").mkdir(exist_ok=True)
        threads = threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) // workers)
        jobs = [_Job(j, model_cfg, train_cfg, train.subset(np.flatnonzero(subsets[j])), test, n_classes, train_seed,
                     str(out / "work" / str(j)), str(out / "margins" / f"{j}.npy"), threads)
                for j in range(m) if not (out / "margins" / f"{j}.npy").is_file()]
        _run_jobs(jobs, m, workers, progress, echo or log.info)
        shutil.rmtree(out / "work", ignore_errors=True)
    finally:
        lock.release()
        try:
            (out / "locks").rmdir()
        except OSError:
            pass
    truth = GroundTruth.open(out, partial=True)
    return GroundTruth(truth.path, truth.subsets[:m], truth.margins[:m], truth.manifest)


def _run_jobs(jobs: list[_Job], m: int, workers: int, progress: bool, echo: Callable[[str], None]) -> None:
    """Run the retrains (in-process or in a spawned pool), reporting progress and an ETA per finished one."""
    if not jobs:
        echo(f"datamodels: all {m} subsets already retrained")
        return
    done0, t0 = m - len(jobs), time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=m, initial=done0, desc="datamodel retrains", unit="subset")

    def finished(i: int, sec: float) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / i * (len(jobs) - i)
        if bar is not None:
            bar.update(1)
        echo(f"datamodels: {done0 + i}/{m} subsets retrained (last {sec:.1f}s; ETA {eta:.0f}s)")

    if workers == 1 or len(jobs) == 1:
        for i, job in enumerate(jobs, 1):
            finished(i, _retrain(job)[1])
    else:
        _pool(jobs, workers, finished)
    if bar is not None:
        bar.close()


def _pool(jobs: list[_Job], workers: int, finished: Callable[[int, float], None]) -> None:
    """The retrains in a pool of spawned processes (fork is unsafe with torch's threads)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(_retrain, job) for job in jobs]
            for i, fut in enumerate(as_completed(futures), 1):
                finished(i, fut.result()[1])
    except BrokenProcessPool as e:
        raise DataError(f"a datamodel retrain process died ({e}); finished subsets are kept, rerun to resume. "
                        "A script that calls this with workers > 1 must guard its body with "
                        "`if __name__ == '__main__':` (the workers are spawned)") from None
