"""The stages of one seed of ``fastinf run``, in order: noise, train, extract, costs, score, evaluate, retrain,
cancellation (per named group, with the self-influence baseline), retrain grid (claim 3).

:func:`run_seed` is the list of steps; each ``_stage_*`` function declares what its stage depends on
(``deps``, plus the marker hashes of the stages before it as ``upstream``), hands the work to
:meth:`StageRunner.stage` (which skips it when cached), then loads the stage's outputs into the
:class:`SeedRun` the next stage reads. Outputs live under ``<out>/seed-<s>/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastinf.data.noise import NoiseResult, inject_noise, load_noise
from fastinf.experiment.checkpoint_methods import CHECKPOINT_METHODS, score_checkpoint_method, stage_checkpoint_stores
from fastinf.experiment.config import to_dict
from fastinf.experiment.costs import apportion_score_time, itemsize, measure_group_costs
from fastinf.experiment.curvature_stage import factor_deps, run_proj, stores_for
from fastinf.experiment.groups import evaluate_seed, named_groups, unit_groups, uses_fused
from fastinf.experiment.retrain import filter_retrain
from fastinf.experiment.rundir import clear_own_dir
from fastinf.experiment.stages import (StageRunner, extract_method_stores, extract_resuming, marker_hash,
                                       stage_factors)

__all__ = ["SeedRun", "run_seed"]


@dataclass
class SeedRun:
    """The state one seed's stages hand to each other."""

    seed: int
    sdir: Path
    train: Any
    test: Any
    noise: NoiseResult | None = None
    noisy_train: Any = None
    best_path: str | None = None
    train_info: dict[str, Any] = field(default_factory=dict)
    stores: dict[str, Any] = field(default_factory=dict)
    units: list[Any] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    upstream: list[str | None] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    retrain_rows: list[dict[str, Any]] = field(default_factory=list)
    cancellation: dict[str, Any] = field(default_factory=dict)   # per named group, and the selfinf baseline
    grid: dict[str, Any] = field(default_factory=dict)           # the retrain grid's rows and split record
    timings: dict[str, float] = field(default_factory=dict)
    _loaded: tuple[Any, Any] | None = None

    def model(self) -> tuple[Any, Any]:
        """The scored checkpoint (model, tokenizer), loaded on first use only (cached stages skip it)."""
        if self._loaded is None:
            from fastinf.experiment.train import load_checkpoint

            self._loaded = load_checkpoint(self.best_path)
        return self._loaded


def run_seed(r: StageRunner, seed: int, train, test) -> SeedRun:
    """All stages of one seed; the returned state holds its metric rows, train info, costs, retrain
    rows, timings and noise mask."""
    ctx = SeedRun(seed=seed, sdir=r.out / f"seed-{seed}", train=train, test=test)
    _stage_noise(r, ctx)
    _stage_train(r, ctx)
    stage_factors(r, ctx)            # K-FAC factor pass when a projection or method needs it (curvature_stage)
    _stage_extract(r, ctx)
    _stage_costs(r, ctx)
    _stage_score(r, ctx)
    _stage_evaluate(r, ctx)
    _stage_retrain(r, ctx)
    _stage_cancellation(r, ctx)
    _stage_retrain_grid(r, ctx)
    return ctx


def _timed(ctx: SeedRun, key: str, marker: dict[str, Any]) -> dict[str, Any]:
    """Add the stage's recorded seconds to the seed's timing ``key``; returns the marker."""
    ctx.timings[key] = ctx.timings.get(key, 0.0) + marker["seconds"]
    return marker


def _stage_noise(r: StageRunner, ctx: SeedRun) -> None:
    """Corrupt the training labels (seeded); ``ctx.noise`` and ``ctx.noisy_train``."""
    cfg, train, test = r.cfg, ctx.train, ctx.test
    deps = {"data": to_dict(cfg.data), "train_fp": train.fingerprint(), "test_fp": test.fingerprint(),
            "noise": to_dict(cfg.noise), "seed": ctx.seed}

    def do() -> dict[str, Any]:
        nz = inject_noise(train.labels, cfg.noise.rate, seed=ctx.seed, kind=cfg.noise.kind,
                          class_rates=cfg.noise.class_rates, transition=cfg.noise.transition,
                          n_classes=int(max(train.labels.max(), test.labels.max())) + 1)
        nz.save(ctx.sdir / "noise.npz")
        return {"n_noisy": nz.n_noisy}

    _timed(ctx, "noise", r.stage(ctx.sdir, "noise", deps, do))
    ctx.noise = load_noise(ctx.sdir / "noise.npz")
    ctx.noisy_train = train.with_labels(ctx.noise.labels)
    r.echo(f"seed {ctx.seed}: {ctx.noise.n_noisy} of {len(train)} training labels corrupted")


def _stage_train(r: StageRunner, ctx: SeedRun) -> None:
    """Fine-tune on the noisy labels; ``ctx.best_path`` (the scored checkpoint) and ``ctx.train_info``."""
    from fastinf.experiment.train import TrainResult, finetune

    from fastinf.experiment.learned import require_learned_result  # learned-or-refuse (evaluate.require_learned)
    from fastinf.experiment.splits import load_named_splits

    cfg = r.cfg
    # data.heldout: the checkpoint is picked (and early stopping / lr: auto judged) on the selection split and
    # learned-or-refuse measured on the evaluation split; with "shared" all three are the influence set
    splits = load_named_splits(cfg)
    shared = cfg.data.heldout == "shared"
    select, evaluation = (ctx.test, None) if shared else (splits.select, splits.evaluation)

    def do() -> dict[str, Any]:
        clear_own_dir(ctx.sdir / "train", "train")      # an earlier (or interrupted) fine-tune of this seed
        res = finetune(cfg.model, cfg.train, ctx.noisy_train, select, ctx.sdir / "train", seed=ctx.seed,
                       n_classes=ctx.noise.n_classes, progress=r.progress, evaluation=evaluation)
        return {"best_epoch": res.best_epoch}

    deps = {"model": to_dict(cfg.model), "train": to_dict(cfg.train)}
    _timed(ctx, "train", r.stage(ctx.sdir, "train", deps, do, upstream=[marker_hash(ctx.sdir, "noise")]))
    tr = TrainResult.load(ctx.sdir / "train")
    ctx.best_path = tr.best.path
    best = tr.best
    r.echo(f"seed {ctx.seed}: fine-tuned ({tr.seconds:.1f}s); scoring epoch {best.epoch} "
           f"(held-out loss {best.heldout_loss:.4f}, acc {best.heldout_acc:.3f})")
    ctx.train_info = {"seed": ctx.seed, "best_epoch": best.epoch, "heldout_loss": best.heldout_loss,
                      "heldout_acc": best.heldout_acc, "seconds": tr.seconds, "lr_log": tr.lr_log()}
    ctx.train_info["learned"] = require_learned_result(cfg, ctx.seed, tr, select.labels, r.echo)


def _stage_extract(r: StageRunner, ctx: SeedRun) -> None:
    """Extract the train and test gradient stores (resuming an interrupted one); ``ctx.stores``,
    ``ctx.units``, ``ctx.groups``."""
    from fastinf.extraction.extract import ExtractStats
    from fastinf.store import GradientStore

    cfg, ex = r.cfg, r.cfg.extract
    deps = {"extract": {k: v for k, v in to_dict(ex).items() if not k.startswith("cost_")},
            "max_length": cfg.model.max_length, **factor_deps(ctx)}
    for split, ds in (("train", ctx.noisy_train), ("test", ctx.test)):
        def do(split: str = split, ds=ds) -> dict[str, Any]:
            model, tok = ctx.model()
            stats = ExtractStats()
            extract_resuming(model, tok, ds, ctx.sdir / "stores" / split, layers=ex.layers,
                             proj=run_proj(ex.proj, ctx.sdir), dtype=ex.dtype, batch_size=ex.batch_size,
                             max_length=cfg.model.max_length, seed=0, progress=r.progress, stats=stats)
            return {"seconds_extract": stats.seconds, "samples": stats.samples}

        _timed(ctx, f"extract_{split}", r.stage(ctx.sdir, f"extract_{split}", deps, do,
                                                upstream=[marker_hash(ctx.sdir, "train")]))
    ctx.stores = {s: GradientStore.open(ctx.sdir / "stores" / s) for s in ("train", "test")}
    ctx.units = ctx.stores["train"].units
    ctx.groups = unit_groups(cfg, ctx.units)
    nbytes = sum(ctx.stores["train"].feature_dim(u.name) for u in ctx.units) * itemsize(ex.dtype)
    r.echo(f"seed {ctx.seed}: stores of {len(ctx.units)} units ({nbytes:,} bytes/sample)")
    ctx.upstream = [marker_hash(ctx.sdir, "extract_train"), marker_hash(ctx.sdir, "extract_test")]
    extract_method_stores(r, ctx)    # the kfac / pca stores of kfac / ekfac when extract.proj differs
    stage_checkpoint_stores(r, ctx)  # tracin (epoch checkpoints) / tracin_we stores (checkpoint_methods)


def _stage_costs(r: StageRunner, ctx: SeedRun) -> None:
    """Time the extraction of each named group (``costs.json``); ``ctx.costs``."""
    ex = r.cfg.extract

    def do() -> dict[str, Any]:
        costs: list[dict[str, Any]] = []
        if ex.cost_repeats > 0:
            model, tok = ctx.model()
            costs = measure_group_costs(model, tok, ctx.noisy_train, named_groups(r.cfg, ctx.units), ctx.units,
                                        ctx.stores["train"], r.cfg)
        (ctx.sdir / "costs.json").write_text(json.dumps(costs, indent=2) + "\n")
        return {}

    deps = {"groups": list(r.cfg.aggregate.groups), "samples": ex.cost_samples, "repeats": ex.cost_repeats}
    _timed(ctx, "costs", r.stage(ctx.sdir, "costs", deps, do, upstream=ctx.upstream))
    ctx.costs = json.loads((ctx.sdir / "costs.json").read_text())


def _stage_score(r: StageRunner, ctx: SeedRun) -> None:
    """Score test x train per method (one cached stage each); apportion the scoring time to the groups.
    Nothing to do on the fused path (the default): there the evaluate stage scores while aggregating."""
    from fastinf.scoring.estimators import score

    if uses_fused(r.cfg):
        return
    score_times: dict[str, float] = {}
    for method in r.cfg.score.methods:
        def do(method: str = method) -> dict[str, Any]:
            t = time.perf_counter()
            if method in CHECKPOINT_METHODS:      # tracin over epoch checkpoints, tracin_we, selfinf
                score_checkpoint_method(ctx.sdir, ctx.stores, method)
            else:
                score(*stores_for(r.cfg, ctx.stores, method), method=method, out=ctx.sdir / "scores" / method,
                      overwrite=True)
            return {"score_s": time.perf_counter() - t}

        m = r.stage(ctx.sdir, f"score_{method}", {"method": method}, do, upstream=ctx.upstream)
        score_times[method] = _timed(ctx, "score", m)["score_s"]
    apportion_score_time(ctx.costs, score_times, ctx.stores["train"], factor_s=ctx.timings.get("factors"))
    ctx.upstream = ctx.upstream + [marker_hash(ctx.sdir, f"score_{m}") for m in r.cfg.score.methods]


def _stage_evaluate(r: StageRunner, ctx: SeedRun) -> None:
    """Aggregate and evaluate every (method, aggregation, group) and baseline (``metrics.json``); ``ctx.rows``.
    On the fused path this stage also scores (per method: one pass over the stores), and its scoring time
    is apportioned to the groups' costs."""
    cfg = r.cfg
    fused = uses_fused(cfg)
    deps = {"aggregate": to_dict(cfg.aggregate), "ndr_at": list(cfg.evaluate.ndr_at),
            "baselines": list(cfg.score.baselines)}
    if fused:                  # (the two-stage deps stay as they were: its cached stages remain valid)
        deps["fused"] = {"methods": list(cfg.score.methods)}

    def do() -> dict[str, Any]:
        score_s: dict[str, float] = {}
        rows = evaluate_seed(cfg, ctx.seed, ctx.sdir, ctx.stores, ctx.groups, ctx.noise.mask, score_s)
        (ctx.sdir / "metrics.json").write_text(json.dumps(rows, indent=1) + "\n")
        return {"rows": len(rows), **({"fused_score_s": score_s} if fused else {})}

    m = _timed(ctx, "score+aggregate+evaluate" if fused else "aggregate+evaluate",
               r.stage(ctx.sdir, "evaluate", deps, do, upstream=ctx.upstream))
    if fused:
        apportion_score_time(ctx.costs, m.get("fused_score_s", {}), ctx.stores["train"],
                             factor_s=ctx.timings.get("factors"))
    ctx.rows = json.loads((ctx.sdir / "metrics.json").read_text())


def _stage_retrain(r: StageRunner, ctx: SeedRun) -> None:
    """Filter and retrain when enabled (``retrain.json``); ``ctx.retrain_rows``."""
    fr = r.cfg.evaluate.filter_retrain
    if not fr.enabled:
        return

    def do() -> dict[str, Any]:
        rows = filter_retrain(r.cfg, ctx.seed, ctx.sdir, ctx.noisy_train, ctx.test, ctx.noise, ctx.stores,
                              ctx.groups)
        (ctx.sdir / "retrain.json").write_text(json.dumps(rows, indent=1) + "\n")
        return {}

    deps = {"filter_retrain": to_dict(fr), "aggregate": to_dict(r.cfg.aggregate)}
    _timed(ctx, "retrain", r.stage(ctx.sdir, "retrain", deps, do, upstream=ctx.upstream))
    ctx.retrain_rows = json.loads((ctx.sdir / "retrain.json").read_text())


def _stage_cancellation(r: StageRunner, ctx: SeedRun) -> None:
    """The cancellation ratio of every named group and the self-influence baseline (``-sum_u ||g_iu||^2``, its
    NDR metrics) from the train store (``cancellation.json``); ``ctx.cancellation``."""
    from fastinf.aggregation.evaluate import group_cancellation
    from fastinf.experiment.metrics import evaluate_scores

    cfg = r.cfg

    def do() -> dict[str, Any]:
        spec = named_groups(cfg, ctx.units)
        canc, self_inf = group_cancellation(ctx.stores["train"], spec)
        rows = [{"seed": ctx.seed, "group": g, "n_units": len(spec[g]), "cancellation": c.l1,
                 "cancellation_l2": c.l2} for g, c in canc.items()]
        sel = {"seed": ctx.seed, "method": "selfinf", "how": "-", "group": "all units", "kind": "baseline",
               **evaluate_scores(self_inf, ctx.noise.mask, cfg.evaluate.ndr_at)}
        (ctx.sdir / "cancellation.json").write_text(json.dumps({"groups": rows, "selfinf": sel}, indent=1) + "\n")
        return {}

    deps = {"groups": list(cfg.aggregate.groups), "ndr_at": list(cfg.evaluate.ndr_at)}
    _timed(ctx, "cancellation", r.stage(ctx.sdir, "cancellation", deps, do, upstream=ctx.upstream[:2]))
    ctx.cancellation = json.loads((ctx.sdir / "cancellation.json").read_text())


def _stage_retrain_grid(r: StageRunner, ctx: SeedRun) -> None:
    """The retrain grid when enabled (``retrain_grid/rows.json``; resumable per setting); ``ctx.grid``."""
    from fastinf.experiment.retrain_grid import GRID_DIR, run_grid

    g = r.cfg.evaluate.retrain_grid
    if not g.enabled:
        return
    path = ctx.sdir / GRID_DIR / "rows.json"

    def do() -> dict[str, Any]:
        res = run_grid(r.cfg, ctx.seed, ctx.sdir, ctx.noisy_train, ctx.test, ctx.noise, ctx.stores, r.echo)
        tmp = path.with_name(".rows.json.tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(path)
        return {"settings": len(res["rows"])}

    cfg = r.cfg
    deps = {"retrain_grid": to_dict(g), "aggregate": {"vote_p": cfg.aggregate.vote_p,
            "correct_only": cfg.aggregate.correct_only}, "ndr_at": list(cfg.evaluate.ndr_at),
            "methods": list(cfg.score.methods), "data": to_dict(cfg.data), "model": to_dict(cfg.model),
            "train": to_dict(cfg.train)}
    _timed(ctx, "retrain_grid", r.stage(ctx.sdir, "retrain_grid", deps, do, upstream=ctx.upstream[:2]))
    ctx.grid = json.loads(path.read_text())
