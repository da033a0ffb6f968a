"""The retrains of the retrain grid (:mod:`.retrain_grid`): one picklable job per setting, cached result files,
a process pool, progress with an ETA.

A job fine-tunes the run's model from the seed's initial checkpoint (the same ``seed``: head / LoRA
initialisation and data order) on the training set without the job's removed rows, selects the checkpoint
on the selection split (the run's ``train.select``), and measures loss and accuracy on the evaluation split.
Its row goes to ``results/<key>.json`` atomically (temp file + rename) together with the digest of everything
it depends on (``recipe``), and its working directory is removed; a file with the same recipe is a finished
setting, so a rerun after a kill redoes only the settings without one. Workers are spawned processes with
one torch thread each (fork is unsafe with torch's threads).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastinf.errors import DataError

__all__ = ["GridJob", "run_jobs", "read_result"]


@dataclass
class GridJob:
    """One setting's retrain: everything a spawned worker needs."""

    key: str
    row: dict[str, Any]          # the setting's fields (method, how, group, p, strategy, ...)
    drop: np.ndarray             # training rows removed
    model_cfg: Any
    train_cfg: Any
    train: Any
    select: Any
    evaluation: Any
    n_classes: int
    seed: int
    recipe: str
    work: str
    dest: str


def read_result(path: Path, recipe: str) -> dict[str, Any] | None:
    """The cached row at ``path`` when it was written for ``recipe`` (else None: redo the setting)."""
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and got.get("recipe") == recipe else None


def _single_class_row(job: GridJob, label: int) -> dict[str, Any]:
    """A removal that left one class: no classifier can be fine-tuned, and the model such a training set
    yields predicts that class everywhere, so its accuracy is that class's share of the evaluation split
    (recorded, with ``single_class``, instead of failing the whole grid)."""
    y = np.asarray(job.evaluation.labels)
    return {"accuracy": float(np.mean(y == label)), "loss": float("nan"), "epoch": 0,
            "single_class": label, "recipe": job.recipe}


def _retrain(job: GridJob) -> tuple[str, float]:
    """Fine-tune without ``job.drop``, evaluate on the evaluation split, write the row; (key, seconds)."""
    import torch

    from fastinf.experiment.train import evaluate_model, finetune, load_checkpoint

    t0 = time.perf_counter()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = Path(job.work)
        if work.exists():
            shutil.rmtree(work)                      # a retrain killed half-way: start it again
        keep = np.setdiff1d(np.arange(len(job.train)), job.drop)
        left = np.unique(np.asarray(job.train.labels)[keep])
        if left.size == 1:
            row = {**job.row, **_single_class_row(job, int(left[0])), "seconds": time.perf_counter() - t0}
        else:
            res = finetune(job.model_cfg, job.train_cfg, job.train.subset(keep), job.select, work, seed=job.seed,
                           n_classes=job.n_classes)
            model, tok = load_checkpoint(res.best.path)
            loss, acc = evaluate_model(model, tok, job.evaluation, max_length=job.model_cfg.max_length)
            row = {**job.row, "accuracy": float(acc), "loss": float(loss), "epoch": int(res.best.epoch),
                   "seconds": time.perf_counter() - t0, "recipe": job.recipe}
        dest = Path(job.dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        tmp.replace(dest)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        torch.set_num_threads(old)
    return job.key, time.perf_counter() - t0


def run_jobs(jobs: list[GridJob], total: int, workers: int, echo: Callable[[str], None]) -> None:
    """Run the pending retrains (in-process for one worker, else a spawned pool), echoing progress and an
    ETA after each finished setting."""
    if not jobs:
        echo(f"retrain grid: all {total} settings already retrained")
        return
    done0, t0 = total - len(jobs), time.perf_counter()
    echo(f"retrain grid: {len(jobs)} of {total} settings to retrain ({workers} worker(s))")

    def finished(i: int, key: str, sec: float) -> None:
        eta = (time.perf_counter() - t0) / i * (len(jobs) - i)
        echo(f"retrain grid: {done0 + i}/{total} settings done ({key}: {sec:.1f}s; ETA {eta:.0f}s)")

    if workers == 1 or len(jobs) == 1:
        for i, job in enumerate(jobs, 1):
            finished(i, *_retrain(job))
        return
    _pool(jobs, workers, finished)


def _pool(jobs: list[GridJob], workers: int, finished: Callable[[int, str, float], None]) -> None:
    """The retrains in a pool of spawned processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(_retrain, job) for job in jobs]
            for i, fut in enumerate(as_completed(futures), 1):
                finished(i, *fut.result())
    except BrokenProcessPool as e:
        raise DataError(f"a retrain-grid process died ({e}); finished settings are kept, rerun to resume. A "
                        "script that runs workers > 1 must guard its body with `if __name__ == '__main__':`") from None
