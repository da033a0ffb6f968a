"""Filter and retrain (``evaluate.filter_retrain``): does removing what influence flags help the model?

The training set is fine-tuned again from scratch after removing nothing (``none``), the lowest p% by
one (method, aggregation, group) score (``influence``), as many random samples (``random``), or
exactly the noisy ones (``oracle``); each retrained model's held-out accuracy and loss is one row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastinf.data.noise import NoiseResult
from fastinf.experiment.config import RunConfig
from fastinf.experiment.metrics import baseline_scores
from fastinf.errors import ConfigError

__all__ = ["filter_retrain"]


def filter_retrain(cfg: RunConfig, seed: int, sdir: Path, noisy_train, test, noise: NoiseResult, stores,
                   groups) -> list[dict[str, Any]]:
    """Retrain after removing the lowest p% (influence), as many random samples, or the noisy ones."""
    from fastinf.experiment.retrain_grid import seed_recipe
    from fastinf.experiment.train import evaluate_model, finetune, load_checkpoint

    fr = cfg.evaluate.filter_retrain
    n = len(noisy_train)
    k = int(round(fr.p / 100 * n))
    scores = _filter_scores(cfg, seed, sdir, stores, groups)
    removals = _removals(scores, noise, n, k, seed)
    tcfg = seed_recipe(cfg, sdir, fr.epochs)      # lr: auto -> the rate the seed's sweep chose
    rows = []
    for strategy, drop in removals.items():
        keep = np.setdiff1d(np.arange(n), drop)
        r = finetune(cfg.model, tcfg, noisy_train.subset(keep), test, sdir / "retrain" / strategy, seed=seed,
                     n_classes=noise.n_classes, progress=False)
        m, tk = load_checkpoint(r.best.path)
        loss, acc = evaluate_model(m, tk, test, max_length=cfg.model.max_length)
        rows.append({"seed": seed, "strategy": strategy, "n_removed": int(drop.size),
                     "noisy_removed": int(noise.mask[drop].sum()), "accuracy": acc, "loss": loss})
    return rows


def _filter_scores(cfg: RunConfig, seed: int, sdir: Path, stores, groups) -> np.ndarray:
    """The score vector that ranks the training samples for removal (a baseline, or one aggregate)."""
    fr = cfg.evaluate.filter_retrain
    if fr.method in ("loss", "random"):
        return baseline_scores(fr.method, stores["train"], seed)
    g = next((g for g in groups if g["group"] == fr.group), None)
    if g is None:
        raise ConfigError(f"evaluate.filter_retrain.group {fr.group!r} is not one of aggregate.groups "
                          f"({', '.join(cfg.aggregate.groups)})")
    if fr.method not in cfg.score.methods:
        raise ConfigError(f"evaluate.filter_retrain.method {fr.method!r} is not in score.methods")
    from fastinf.experiment.groups import aggregated_scores   # fused result file, or the score set

    return aggregated_scores(cfg, sdir, stores, fr.method, fr.how, fr.group, g["units"])


def _removals(scores: np.ndarray, noise: NoiseResult, n: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """Strategy -> indices to drop: none, the k lowest-scored, k random (seeded), the noisy ones."""
    rng = np.random.default_rng(seed + 7919)
    return {
        "none": np.array([], dtype=np.int64),
        "influence": np.argsort(scores, kind="stable")[:k],
        "random": rng.choice(n, size=k, replace=False),
        "oracle": np.flatnonzero(noise.mask),
    }
