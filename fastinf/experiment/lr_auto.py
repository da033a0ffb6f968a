"""``train.lr: auto``: a short learning-rate sweep before the fine-tune, chosen on the checkpoint-selection split.

Each candidate of ``train.lr_sweep`` is trained from the same seeded initial state for
``train.lr_sweep_epochs`` epochs (the recipe otherwise unchanged; the schedule spans the short budget; no
early stopping, nothing saved); the candidate with the highest held-out accuracy wins, ties going to the
lower held-out loss, then to the earlier candidate. The sweep is recorded in ``<train dir>/lr_sweep.json``
after every candidate (atomic write), keyed by a hash of everything a candidate depends on, so an
interrupted sweep resumes with the candidates not yet done and a rerun of a finished one trains nothing.

The runner (``run(cfg) -> (loss, acc)``) is handed in by :func:`fastinf.experiment.train.finetune`, so this
module does not import the training loop (no import cycle).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fastinf.errors import ConfigError
from fastinf.experiment.config import ModelConfig, TrainConfig, config_hash, to_dict
from fastinf.store.durable import atomic_write_json

__all__ = ["SWEEP_FILE", "choose_lr", "pick_best", "sweep_key"]

SWEEP_FILE = "lr_sweep.json"


def sweep_key(model_cfg: ModelConfig, cfg: TrainConfig, train: Any, heldout: Any, seed: int,
              n_classes: int) -> str:
    """The hash of what a sweep's outcome depends on: model, recipe (lr aside), seed, classes and data."""
    h = hashlib.sha256()
    for data in (train, heldout):
        pairs = getattr(data, "text_pairs", None)
        h.update(json.dumps([list(data.texts), list(pairs) if pairs is not None else None,
                             [int(v) for v in data.labels]]).encode())
    recipe = {k: v for k, v in to_dict(cfg).items() if k not in ("lr", "patience", "epochs", "select")}
    return config_hash({"model": to_dict(model_cfg), "recipe": recipe, "seed": seed, "n_classes": n_classes,
                        "data": h.hexdigest()}, length=24)


def pick_best(results: list[dict[str, Any]]) -> float:
    """The winning lr: highest ``heldout_acc``, then lowest ``heldout_loss``, then the earliest candidate."""
    best = min(range(len(results)), key=lambda i: (-results[i]["heldout_acc"], results[i]["heldout_loss"], i))
    return float(results[best]["lr"])


def _read(path: Path, key: str) -> list[dict[str, Any]]:
    """The candidates already done under the same key (none when the file is missing, damaged or stale)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return list(rec.get("results", [])) if isinstance(rec, dict) and rec.get("key") == key else []


def choose_lr(model_cfg: ModelConfig, cfg: TrainConfig, train: Any, heldout: Any, out: Path, *, seed: int,
              n_classes: int, run: Callable[[TrainConfig], tuple[float, float]]) -> float:
    """Run (or resume) the sweep into ``out / lr_sweep.json`` and return the chosen learning rate."""
    if heldout is None:
        raise ConfigError("train.lr: auto needs a checkpoint-selection split to compare the candidates; pass a "
                          "held-out set, or set train.lr to the number an earlier run chose (its lr_sweep.json)")
    path = Path(out) / SWEEP_FILE
    key = sweep_key(model_cfg, cfg, train, heldout, seed, n_classes)
    done = {float(r["lr"]): r for r in _read(path, key)}
    results = []
    for lr in cfg.lr_sweep:
        if float(lr) not in done:
            t = time.perf_counter()
            short = replace(cfg, lr=float(lr), epochs=cfg.lr_sweep_epochs, patience=None, select="last")
            loss, acc = run(short)
            done[float(lr)] = {"lr": float(lr), "heldout_loss": float(loss), "heldout_acc": float(acc),
                               "epochs": cfg.lr_sweep_epochs, "seconds": time.perf_counter() - t}
        results.append(done[float(lr)])
        atomic_write_json(path, {"key": key, "results": results, "chosen": None})
    chosen = pick_best(results)
    atomic_write_json(path, {"key": key, "results": results, "chosen": chosen})
    return chosen
