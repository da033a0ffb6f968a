"""The cached stages of ``fastinf curate``: fine-tune (with a recipe), extract, fused influence, write.

Each stage goes through :meth:`fastinf.experiment.stages.StageRunner.stage`: its ``<stage>.done.json``
marker holds the hash of what it depends on (and of the stages before it), so a rerun of the same request
reuses finished work, an interrupted extraction resumes its store, an interrupted fused pass resumes from
its committed state, and a changed option re-runs only what depends on it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import StoreError, StoreMismatchError
from fastinf.experiment.stages import StageRunner, marker_hash

__all__ = ["stage_model", "stage_extract", "stage_influence", "model_signature"]


def model_signature(path: str) -> Any:
    """A cheap identity of a model directory (top-level file names, sizes, mtimes), or its name."""
    p = Path(path)
    if not p.is_dir():
        return path
    return [path] + sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in p.iterdir() if e.is_file())


def stage_model(r: StageRunner, out: Path, data: Any, model: Any, recipe: Any, seed: int) -> str:
    """The model to score with: ``model`` itself, or (with a recipe) the checkpoint fine-tuned on the
    scored rows with the reference set held out (``<out>/train``)."""
    from fastinf.curation.inputs import read_recipe, resolve_model

    if recipe is None:
        return resolve_model(model)
    from fastinf.experiment.config import to_dict
    from fastinf.experiment.rundir import clear_own_dir
    from fastinf.experiment.train import TrainResult, finetune

    model_cfg, train_cfg = read_recipe(recipe, model)
    n_classes = int(max(data.full.labels.max(), data.reference.labels.max())) + 1

    def do() -> dict[str, Any]:
        clear_own_dir(out / "train", "train")
        res = finetune(model_cfg, train_cfg, data.train, data.reference, out / "train", seed=seed,
                       n_classes=n_classes, progress=r.progress)
        return {"best_epoch": res.best_epoch}

    deps = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "seed": seed,
            "data": data.train.fingerprint(), "reference": data.reference.fingerprint()}
    r.stage(out, "train", deps, do)
    best = TrainResult.load(out / "train").best
    r.echo(f"fine-tuned: scoring epoch {best.epoch} (held-out acc {best.heldout_acc})")
    return str(best.path)


def _extract_one(model: Any, tok: Any, ds: Any, path: Path, kw: dict[str, Any]) -> None:
    """Extract ``ds`` into the store ``path``, resuming an interrupted store (or starting it over)."""
    from fastinf.extraction.extract import extract

    resume = (path / "manifest.json").exists()
    try:
        extract(model, tok, ds, path, resume=resume, overwrite=not resume, **kw)
    except StoreError:
        if not resume:
            raise
        extract(model, tok, ds, path, overwrite=True, **kw)


def stage_extract(r: StageRunner, out: Path, data: Any, model_path: str, opts: dict[str, Any]) -> tuple[Any, Any]:
    """The train and reference GradientStores of the chosen layers (``<out>/stores/{train,reference}``)."""
    import torch

    from fastinf.extraction.models import load_model
    from fastinf.store import GradientStore

    loaded: list[Any] = []
    n_classes = int(max(data.full.labels.max(), data.reference.labels.max())) + 1

    def model() -> tuple[Any, Any]:
        if not loaded:
            loaded.extend(load_model(model_path, task="seq-cls", num_labels=n_classes))
        return loaded[0], loaded[1]

    kw = dict(layers=opts["extract_layers"], proj=opts["proj"], dtype=opts["dtype"], batch_size=opts["batch_size"],
              max_length=opts["max_length"], seed=0, progress=r.progress,
              device="cuda" if torch.cuda.is_available() else "cpu")
    deps = {"model": model_signature(model_path), **{k: str(v) for k, v in kw.items() if k != "progress"}}
    up = [marker_hash(out, "train")]
    for split, ds in (("train", data.train), ("reference", data.reference)):
        def do(split: str = split, ds: Any = ds) -> dict[str, Any]:
            m, tok = model()
            _extract_one(m, tok, ds, out / "stores" / split, kw)
            return {"rows": len(ds)}

        r.stage(out, f"extract_{split}", {**deps, "data": ds.fingerprint()}, do, upstream=up)
    return GradientStore.open(out / "stores" / "train"), GradientStore.open(out / "stores" / "reference")


def stage_influence(r: StageRunner, out: Path, stores: tuple[Any, Any], opts: dict[str, Any]) -> np.ndarray:
    """Aggregated influence of every scored row (``scores.npy``), from one resumable fused pass."""
    from fastinf.curation.scoring import influence_scores

    train, ref = stores
    keys = ("method", "how", "damping", "vote_p")

    def do() -> dict[str, Any]:
        agg = out / "influence.parquet"
        state = agg.with_name(f".{agg.name}.fused-state.npz")
        kw = dict(method=opts["method"], how=opts["how"], group="all", damping=opts["damping"],
                  vote_p=opts["vote_p"], out=agg, progress=r.progress)
        try:
            s = influence_scores(train, ref, resume=state.exists(), **kw)
        except StoreMismatchError:       # the state of an interrupted pass of another request: start over
            s = influence_scores(train, ref, overwrite=True, **kw)
        tmp = out / ".scores.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, s)
        tmp.replace(out / "scores.npy")
        return {"n": int(len(s))}

    up = [marker_hash(out, "extract_train"), marker_hash(out, "extract_reference")]
    r.stage(out, "influence", {k: opts[k] for k in keys}, do, upstream=up)
    return np.load(out / "scores.npy", allow_pickle=False)


def write_request(out: Path, request: dict[str, Any]) -> None:
    """``curate.json``: the request (replayable record), written atomically."""
    tmp = out / ".curate.json.tmp"
    tmp.write_text(json.dumps(request, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(out / "curate.json")
