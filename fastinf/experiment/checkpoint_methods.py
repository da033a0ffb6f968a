"""The estimators of ``fastinf run`` that need more than the scored checkpoint's two stores.

* ``tracin`` — TracIn over the fine-tune's epoch checkpoints: ``Σ_e lr_e ⟨g_test,e, g_train,e⟩`` with
  ``lr_e`` the learning rate recorded for epoch ``e`` (``lr_log.json``); stores of every epoch ``e >= 1``
  are extracted with the run's extraction settings into ``seed-<s>/stores/tracin/ckpt-<e>/`` (the scored
  epoch reuses the run's stores).
* ``tracin_we`` — TracIn-WE through the input embedding's per-token gradients: stores with token gradients
  of the embedding unit (``seed-<s>/stores/tracin_we/``); only unit groups made of that unit are scored.
* ``selfinf`` — self-influence ``−gᵀH⁻¹g`` of each training sample (one row; no test samples).

Each is scored into a per-unit score set ``seed-<s>/scores/<method>`` and aggregated with ``aggregate_all``
(on the fused path as well: none of them is one GEMM per unit). Hooks: :func:`stage_checkpoint_stores` at the
end of the extract stage, :func:`score_checkpoint_method` in the two-stage score stage and
:func:`aggregate_checkpoint_method` in ``groups.aggregate_groups``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHECKPOINT_METHODS", "stage_checkpoint_stores", "score_checkpoint_method",
           "aggregate_checkpoint_method", "tracin_terms"]

CHECKPOINT_METHODS = ("tracin", "tracin_we", "selfinf")
_WE_LAYERS = "embedding"


def _epochs(sdir: Path) -> tuple[list[Any], int]:
    """The fine-tune's checkpoints of epochs >= 1 and the scored (best) epoch."""
    from fastinf.experiment.train import TrainResult

    tr = TrainResult.load(sdir / "train")
    return [c for c in tr.checkpoints if c.epoch >= 1], tr.best_epoch


def _store_dir(sdir: Path, method: str, epoch: int | None = None) -> Path:
    base = sdir / "stores" / method
    return base / f"ckpt-{epoch}" if epoch is not None else base


def tracin_terms(sdir: Path, stores: dict[str, Any]) -> list[tuple[Any, Any, float]]:
    """``[(test_e, train_e, lr_e), ...]`` over the epoch checkpoints (the scored epoch: the run's stores)."""
    ckpts, best = _epochs(sdir)
    out = []
    for c in ckpts:
        pair = stores if c.epoch == best else {s: _store_dir(sdir, "tracin", c.epoch) / s for s in ("test", "train")}
        out.append((pair["test"], pair["train"], float(c.lr)))
    return out


def _extract_pairs(r: Any, ctx: Any, jobs: list[tuple[str, Path, dict]]) -> None:
    """Extract the train and test stores of each ``(checkpoint path, directory, extra kwargs)`` job."""
    from fastinf.extraction.checkpoint import load_checkpoint
    from fastinf.extraction.extract import extract

    ex, cfg = r.cfg.extract, r.cfg
    for ckpt, path, extra in jobs:
        model, tok = load_checkpoint(ckpt)
        for split, ds in (("train", ctx.noisy_train), ("test", ctx.test)):
            kw = dict(layers=ex.layers, proj=ex.proj, dtype=ex.dtype, batch_size=ex.batch_size,
                      max_length=cfg.model.max_length, seed=0, progress=r.progress)
            extract(model, tok, ds, path / split, overwrite=True, **{**kw, **extra})


def stage_checkpoint_stores(r: Any, ctx: Any) -> None:
    """Cached stages ``extract_tracin`` / ``extract_tracin_we`` (only when the methods are asked for); their
    markers join ``ctx.upstream`` so that scoring reruns when they change."""
    from fastinf.experiment.config import to_dict
    from fastinf.experiment.stages import marker_hash

    methods = [m for m in ("tracin", "tracin_we") if m in r.cfg.score.methods]
    deps = {"extract": {k: v for k, v in to_dict(r.cfg.extract).items() if not k.startswith("cost_")},
            "max_length": r.cfg.model.max_length}
    for method in methods:
        def do(method: str = method) -> dict[str, Any]:
            t = time.perf_counter()
            if method == "tracin":
                ckpts, best = _epochs(ctx.sdir)
                jobs = [(c.path, _store_dir(ctx.sdir, "tracin", c.epoch), {}) for c in ckpts if c.epoch != best]
            else:
                jobs = [(ctx.best_path, _store_dir(ctx.sdir, "tracin_we"),
                         {"layers": _WE_LAYERS, "token_grads": True})]
            _extract_pairs(r, ctx, jobs)
            return {"seconds_extract": time.perf_counter() - t}

        m = r.stage(ctx.sdir, f"extract_{method}", {**deps, "method": method}, do,
                    upstream=[marker_hash(ctx.sdir, "train")])
        ctx.timings[f"extract_{method}"] = ctx.timings.get(f"extract_{method}", 0.0) + m["seconds"]
        ctx.upstream = ctx.upstream + [marker_hash(ctx.sdir, f"extract_{method}")]


def score_checkpoint_method(sdir: Path, stores: dict[str, Any], method: str) -> Any:
    """Write (replace) the per-unit score set ``sdir/scores/<method>`` of one of :data:`CHECKPOINT_METHODS`."""
    from fastinf.scoring.estimators import score
    from fastinf.store import GradientStore

    out = sdir / "scores" / method
    if method == "tracin":
        return score(None, None, "tracin", checkpoints=tracin_terms(sdir, stores), out=out, overwrite=True)
    if method == "selfinf":
        return score(None, stores["train"], "selfinf", out=out, overwrite=True)
    we = {s: GradientStore.open(_store_dir(sdir, "tracin_we") / s) for s in ("test", "train")}
    return score(we["test"], we["train"], "tracin_we", out=out, overwrite=True)


def aggregate_checkpoint_method(cfg: Any, sdir: Path, stores: dict[str, Any], method: str, groups: list[dict],
                                timing: dict[str, float] | None, fused: bool) -> dict[tuple, np.ndarray]:
    """(method, how, group) -> aggregated scores [N] for one of :data:`CHECKPOINT_METHODS` (scored here on the
    fused path, read from the score stage's set otherwise); groups whose units the set lacks are left out."""
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.scoring.scores import ScoreSet

    t = time.perf_counter()
    s = score_checkpoint_method(sdir, stores, method) if fused else ScoreSet.open(sdir / "scores" / method)
    if timing is not None and fused:
        timing[method] = time.perf_counter() - t
    names = set(s.unit_names)
    keep = [g for g in groups if g["units"] and set(g["units"]) <= names]
    if not keep:
        return {}
    a = cfg.aggregate
    res = aggregate_all(s, how=list(a.how), vote_p=a.vote_p, correct_only=a.correct_only and method != "selfinf",
                        groups={g["group"]: g["units"] for g in keep})
    return {(method, how, g["group"]): res.get(g["group"], how) for g in keep for how in a.how}
