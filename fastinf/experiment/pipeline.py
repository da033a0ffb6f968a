"""``fastinf run``: the whole layer-wise influence experiment, staged, cached and resumable.

For every seed::

    data split -> noise -> fine-tune -> extract train & test stores -> measure group costs
               -> score (per method) -> aggregate (method x aggregation x unit group) -> evaluate
               -> [filter and retrain]
    then, over seeds: summary (mean ± std) -> report (fastinf.report)

Every stage writes its outputs under ``<out>/seed-<s>/`` and a ``<stage>.done.json`` marker holding
the hash of the configuration the stage depends on (:func:`fastinf.config.config_hash`) and its wall
time. A re-run skips a stage whose marker matches, and redoes a stage (and everything after it) whose
inputs changed; an interrupted extraction resumes from its last complete chunk. So editing
``aggregate.how`` re-runs only aggregation, and editing ``noise.rate`` re-runs from noise injection.

Unit groups (DESIGN, Aggregation): the named selectors of ``aggregate.groups`` (first, q1..q4, last,
all, ...), and with ``aggregate.per_block`` one group per block (``block[i]``) and one per single unit
(its exact name) — the latter two feed the layer-wise curves of the report.

Costs (the report's cost-versus-quality table): for each named group, the capture of one batch of
``extract.cost_samples`` training samples restricted to that group's units (forward, backward down to
the group's lowest unit, projections) is timed, fastest of ``extract.cost_repeats``; its share of the
all-units time is the group's extraction cost. Bytes per sample come from the stores' feature sizes;
scoring time is measured per method and apportioned by feature dimension.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastinf.experiment.config import RunConfig, config_hash, to_dict
from fastinf.errors import ConfigError, DataError, SelectorError, StoreError
from fastinf.data.noise import NoiseResult, inject_noise, load_noise

__all__ = ["run_experiment", "RunResult", "load_splits", "metric_keys", "evaluate_scores", "chance_levels",
           "baseline_scores", "measure_group_costs"]

log = logging.getLogger(__name__)

_DONE = ".done.json"


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


def _done_path(stage_dir: Path, name: str) -> Path:
    return stage_dir / f"{name}{_DONE}"


def _cached(stage_dir: Path, name: str, digest: str) -> dict[str, Any] | None:
    path = _done_path(stage_dir, name)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("hash") == digest else None


def _mark(stage_dir: Path, name: str, digest: str, seconds: float, run_hash: str, **info: Any) -> dict[str, Any]:
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker = {"stage": name, "hash": digest, "config_hash": run_hash, "seconds": seconds, **info}
    tmp = _done_path(stage_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str) + "\n")
    tmp.replace(_done_path(stage_dir, name))
    return marker


def _invalidate(stage_dir: Path, name: str) -> None:
    _done_path(stage_dir, name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# data


def _load_spec(spec: Any, default_split: str):
    from fastinf.data.datasets import load_dataset_spec

    if isinstance(spec, str):
        return load_dataset_spec(spec, split=default_split)
    kw = dict(spec)
    path = kw.pop("path")
    kw.setdefault("split", default_split)
    return load_dataset_spec(str(path), **kw)


def load_splits(cfg: RunConfig):
    """(train, test) ``TextDataset``s per ``cfg.data``: loaded, split if needed, subsampled (seeded)."""
    d = cfg.data
    full = _load_spec(d.train, "train")
    rng = np.random.default_rng(d.split_seed)
    if d.test is None:
        perm = rng.permutation(len(full))
        n_test = max(1, int(round(d.test_fraction * len(full))))
        test, train = full.subset(np.sort(perm[:n_test]), "test"), full.subset(np.sort(perm[n_test:]), "train")
    else:
        train, test = full, _load_spec(d.test, "test")
    if d.n_train is not None and d.n_train < len(train):
        train = train.subset(np.sort(rng.permutation(len(train))[:d.n_train]), train.name)
    if d.n_test is not None and d.n_test < len(test):
        test = test.subset(np.sort(rng.permutation(len(test))[:d.n_test]), test.name)
    for name, ds in (("training", train), ("test", test)):
        if ds.labels is None:
            raise DataError(f"the {name} set has no labels; fastinf run needs labelled data")
        classes = np.unique(ds.labels)
        if name == "training" and classes.size < 2:
            raise DataError(f"the training set has a single class ({int(classes[0])}); label noise and a "
                            "classifier both need at least two. Check the label column or data.n_train.")
    return train, test


# ----------------------------------------------------------------------------------------------
# evaluation of one score vector


def metric_keys(cfg: RunConfig) -> list[str]:
    """Metric names, headline first: ``ndr@<p>`` for each ``evaluate.ndr_at``, then AUC_NDR, ROC-AUC."""
    return [f"ndr@{p:g}" for p in cfg.evaluate.ndr_at] + ["auc_ndr", "roc_auc"]


def evaluate_scores(scores: np.ndarray, mask: np.ndarray, ndr_at: Sequence[float]) -> dict[str, float]:
    """NDR@p for each p, AUC_NDR and ROC-AUC of one aggregated score vector (lowest = most detrimental)."""
    from fastinf.aggregation import evaluate as ev

    out = {f"ndr@{p:g}": float(ev.ndr(scores, mask, at=p)) for p in ndr_at}
    out["auc_ndr"] = float(ev.auc_ndr(scores, mask))
    out["roc_auc"] = float(ev.roc_auc(scores, mask))
    return out


def chance_levels(mask: np.ndarray, ndr_at: Sequence[float]) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking: NDR@p = p/100, ROC-AUC = 0.5, and AUC_NDR."""
    n, n_noise = mask.size, int(mask.sum())
    n_clean = n - n_noise
    # E[c(k)] = k/N for a random order, so E[sum_k c(k)] = (N+1)/2
    auc = ((n + 1) / 2) / (n_noise / 2 + n_clean) if n_noise else float("nan")
    return {**{f"ndr@{p:g}": int(np.floor(p * n / 100 + 0.5)) / n for p in ndr_at}, "auc_ndr": auc,
            "roc_auc": 0.5}


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class RunResult:
    """What :func:`run_experiment` produced: the results mapping and the report files."""

    out: Path
    results: dict[str, Any]
    report: Any
    stages_run: list[str] = field(default_factory=list)
    stages_cached: list[str] = field(default_factory=list)


@dataclass
class _SeedRun:
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
    timings: dict[str, float] = field(default_factory=dict)
    _loaded: tuple[Any, Any] | None = None

    def model(self) -> tuple[Any, Any]:
        """The scored checkpoint (model, tokenizer), loaded on first use only (cached stages skip it)."""
        if self._loaded is None:
            from fastinf.experiment.train import load_checkpoint

            self._loaded = load_checkpoint(self.best_path)
        return self._loaded


class _Runner:
    def __init__(self, cfg: RunConfig, out: Path, progress: bool, echo: Callable[[str], None]) -> None:
        self.cfg, self.out, self.progress, self.echo = cfg, out, progress, echo
        self.run_hash = config_hash(cfg)
        self.ran: list[str] = []
        self.cached: list[str] = []

    # a stage: run ``fn`` unless its marker matches ``deps``; always returns the marker
    def stage(self, stage_dir: Path, name: str, deps: Any, fn: Callable[[], dict[str, Any]],
              upstream: Sequence[str] = ()) -> dict[str, Any]:
        digest = config_hash({"deps": deps, "upstream": list(upstream)})
        marker = _cached(stage_dir, name, digest)
        label = f"{stage_dir.name}/{name}"
        if marker is not None:
            self.cached.append(label)
            return marker
        t0 = time.perf_counter()
        info = fn() or {}
        self.ran.append(label)
        return _mark(stage_dir, name, digest, time.perf_counter() - t0, self.run_hash, **info)

    def run(self) -> RunResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(self.out / "config.yaml")
        (self.out / "config_hash.txt").write_text(self.run_hash + "\n")
        t0 = time.perf_counter()
        train, test = load_splits(cfg)
        t_data = time.perf_counter() - t0
        self.echo(f"data: {len(train)} train / {len(test)} test samples")
        rows: list[dict[str, Any]] = []
        train_info, retrain_rows, costs_all = [], [], []
        timings: dict[str, float] = {"data": t_data}
        mask0 = None
        for seed in cfg.seeds:
            seed_rows, tinfo, costs, rr, tim, mask = self.run_seed(seed, train, test)
            rows += seed_rows
            train_info.append(tinfo)
            costs_all.append(costs)
            retrain_rows += rr
            for k, v in tim.items():
                timings[k] = timings.get(k, 0.0) + v
            mask0 = mask
        metrics = metric_keys(cfg)
        results: dict[str, Any] = {
            "title": f"fastinf run: {cfg.name}",
            "fastinf_version": _version(),
            "config_hash": self.run_hash,
            "config": to_dict(cfg),
            "metrics": metrics,
            "setup": {"model": cfg.model.name, "train samples": len(train), "test samples": len(test),
                      "noise": f"{cfg.noise.kind} {cfg.noise.rate:g}", "seeds": list(cfg.seeds),
                      "methods": list(cfg.score.methods), "aggregations": list(cfg.aggregate.how),
                      "projection": cfg.extract.proj, "layers": cfg.extract.layers,
                      "chance": chance_levels(mask0, cfg.evaluate.ndr_at)},
            "rows": rows,
            "costs": _mean_costs(costs_all),
            "train": train_info,
            "filter_retrain": retrain_rows,
            "timings": timings,
        }
        from fastinf.experiment.report import write_report

        report = write_report(results, self.out)
        return RunResult(out=self.out, results=results, report=report, stages_run=self.ran,
                         stages_cached=self.cached)

    # ------------------------------------------------------------------------------------------
    def run_seed(self, seed: int, train, test):
        """All stages of one seed; returns (metric rows, train info, costs, retrain rows, timings, mask)."""
        ctx = _SeedRun(seed=seed, sdir=self.out / f"seed-{seed}", train=train, test=test)
        self.stage_noise(ctx)
        self.stage_train(ctx)
        self.stage_extract(ctx)
        self.stage_costs(ctx)
        self.stage_score(ctx)
        self.stage_evaluate(ctx)
        self.stage_retrain(ctx)
        return ctx.rows, ctx.train_info, ctx.costs, ctx.retrain_rows, ctx.timings, ctx.noise.mask

    def _timed(self, ctx: "_SeedRun", key: str, marker: dict[str, Any]) -> dict[str, Any]:
        ctx.timings[key] = ctx.timings.get(key, 0.0) + marker["seconds"]
        return marker

    def stage_noise(self, ctx: "_SeedRun") -> None:
        cfg, train, test = self.cfg, ctx.train, ctx.test
        deps = {"data": to_dict(cfg.data), "train_fp": train.fingerprint(), "test_fp": test.fingerprint(),
                "noise": to_dict(cfg.noise), "seed": ctx.seed}

        def do() -> dict[str, Any]:
            nz = inject_noise(train.labels, cfg.noise.rate, seed=ctx.seed, kind=cfg.noise.kind,
                              class_rates=cfg.noise.class_rates, transition=cfg.noise.transition,
                              n_classes=int(max(train.labels.max(), test.labels.max())) + 1)
            nz.save(ctx.sdir / "noise.npz")
            return {"n_noisy": nz.n_noisy}

        self._timed(ctx, "noise", self.stage(ctx.sdir, "noise", deps, do))
        ctx.noise = load_noise(ctx.sdir / "noise.npz")
        ctx.noisy_train = train.with_labels(ctx.noise.labels)
        self.echo(f"seed {ctx.seed}: {ctx.noise.n_noisy} of {len(train)} training labels corrupted")

    def stage_train(self, ctx: "_SeedRun") -> None:
        from fastinf.experiment.train import TrainResult, finetune

        cfg = self.cfg

        def do() -> dict[str, Any]:
            shutil.rmtree(ctx.sdir / "train", ignore_errors=True)
            r = finetune(cfg.model, cfg.train, ctx.noisy_train, ctx.test, ctx.sdir / "train", seed=ctx.seed,
                         n_classes=ctx.noise.n_classes, progress=self.progress)
            return {"best_epoch": r.best_epoch}

        deps = {"model": to_dict(cfg.model), "train": to_dict(cfg.train)}
        self._timed(ctx, "train", self.stage(ctx.sdir, "train", deps, do, upstream=[_marker_hash(ctx.sdir, "noise")]))
        tr = TrainResult.load(ctx.sdir / "train")
        ctx.best_path = tr.best.path
        best = tr.best
        self.echo(f"seed {ctx.seed}: fine-tuned ({tr.seconds:.1f}s); scoring epoch {best.epoch} "
                  f"(held-out loss {best.heldout_loss:.4f}, acc {best.heldout_acc:.3f})")
        ctx.train_info = {"seed": ctx.seed, "best_epoch": best.epoch, "heldout_loss": best.heldout_loss,
                          "heldout_acc": best.heldout_acc, "seconds": tr.seconds, "lr_log": tr.lr_log()}

    def stage_extract(self, ctx: "_SeedRun") -> None:
        from fastinf.extraction.extract import ExtractStats, extract
        from fastinf.store.gradient_store import GradientStore

        cfg, ex = self.cfg, self.cfg.extract
        deps = {"extract": {k: v for k, v in to_dict(ex).items() if not k.startswith("cost_")},
                "max_length": cfg.model.max_length}
        for split, ds in (("train", ctx.noisy_train), ("test", ctx.test)):
            def do(split: str = split, ds=ds) -> dict[str, Any]:
                model, tok = ctx.model()
                stats = ExtractStats()
                path = ctx.sdir / "stores" / split
                resume = (path / "manifest.json").exists()
                kw = dict(layers=ex.layers, proj=ex.proj, dtype=ex.dtype, batch_size=ex.batch_size,
                          max_length=cfg.model.max_length, seed=0, progress=self.progress, stats=stats)
                try:
                    extract(model, tok, ds, path, resume=resume, overwrite=not resume, **kw)
                except StoreError:       # an interrupted store that cannot be resumed: start over
                    if not resume:
                        raise
                    extract(model, tok, ds, path, overwrite=True, **kw)
                return {"seconds_extract": stats.seconds, "samples": stats.samples}

            self._timed(ctx, f"extract_{split}", self.stage(ctx.sdir, f"extract_{split}", deps, do,
                                                            upstream=[_marker_hash(ctx.sdir, "train")]))
        ctx.stores = {s: GradientStore.open(ctx.sdir / "stores" / s) for s in ("train", "test")}
        ctx.units = ctx.stores["train"].units
        ctx.groups = self.groups(ctx.units)
        nbytes = sum(ctx.stores["train"].feature_dim(u.name) for u in ctx.units) * _itemsize(ex.dtype)
        self.echo(f"seed {ctx.seed}: stores of {len(ctx.units)} units ({nbytes:,} bytes/sample)")
        ctx.upstream = [_marker_hash(ctx.sdir, "extract_train"), _marker_hash(ctx.sdir, "extract_test")]

    def stage_costs(self, ctx: "_SeedRun") -> None:
        ex = self.cfg.extract

        def do() -> dict[str, Any]:
            costs: list[dict[str, Any]] = []
            if ex.cost_repeats > 0:
                model, tok = ctx.model()
                costs = measure_group_costs(model, tok, ctx.noisy_train, self.named_groups(ctx.units), ctx.units,
                                            ctx.stores["train"], self.cfg)
            (ctx.sdir / "costs.json").write_text(json.dumps(costs, indent=2) + "\n")
            return {}

        deps = {"groups": list(self.cfg.aggregate.groups), "samples": ex.cost_samples, "repeats": ex.cost_repeats}
        self._timed(ctx, "costs", self.stage(ctx.sdir, "costs", deps, do, upstream=ctx.upstream))
        ctx.costs = json.loads((ctx.sdir / "costs.json").read_text())

    def stage_score(self, ctx: "_SeedRun") -> None:
        from fastinf.scoring.estimators import score

        score_times: dict[str, float] = {}
        for method in self.cfg.score.methods:
            def do(method: str = method) -> dict[str, Any]:
                t = time.perf_counter()
                score(ctx.stores["test"], ctx.stores["train"], method=method, out=ctx.sdir / "scores" / method,
                      overwrite=True)
                return {"score_s": time.perf_counter() - t}

            m = self.stage(ctx.sdir, f"score_{method}", {"method": method}, do, upstream=ctx.upstream)
            score_times[method] = self._timed(ctx, "score", m)["score_s"]
        _apportion_score_time(ctx.costs, score_times, ctx.stores["train"])
        ctx.upstream = ctx.upstream + [_marker_hash(ctx.sdir, f"score_{m}") for m in self.cfg.score.methods]

    def stage_evaluate(self, ctx: "_SeedRun") -> None:
        cfg = self.cfg
        deps = {"aggregate": to_dict(cfg.aggregate), "ndr_at": list(cfg.evaluate.ndr_at),
                "baselines": list(cfg.score.baselines)}

        def do() -> dict[str, Any]:
            rows = self.evaluate_seed(ctx.seed, ctx.sdir, ctx.stores, ctx.groups, ctx.noise.mask)
            (ctx.sdir / "metrics.json").write_text(json.dumps(rows, indent=1) + "\n")
            return {"rows": len(rows)}

        self._timed(ctx, "aggregate+evaluate", self.stage(ctx.sdir, "evaluate", deps, do, upstream=ctx.upstream))
        ctx.rows = json.loads((ctx.sdir / "metrics.json").read_text())

    def stage_retrain(self, ctx: "_SeedRun") -> None:
        fr = self.cfg.evaluate.filter_retrain
        if not fr.enabled:
            return

        def do() -> dict[str, Any]:
            rows = self.filter_retrain(ctx.seed, ctx.sdir, ctx.noisy_train, ctx.test, ctx.noise, ctx.stores,
                                       ctx.groups)
            (ctx.sdir / "retrain.json").write_text(json.dumps(rows, indent=1) + "\n")
            return {}

        deps = {"filter_retrain": to_dict(fr), "aggregate": to_dict(self.cfg.aggregate)}
        self._timed(ctx, "retrain", self.stage(ctx.sdir, "retrain", deps, do, upstream=ctx.upstream))
        ctx.retrain_rows = json.loads((ctx.sdir / "retrain.json").read_text())

    # ------------------------------------------------------------------------------------------
    def named_groups(self, units) -> dict[str, list[str]]:
        """``aggregate.groups`` resolved to unit names; a group matching no unit is an error."""
        from fastinf.extraction.units import select

        out = {}
        for g in self.cfg.aggregate.groups:
            try:
                out[g] = [u.name for u in select(units, g)]
            except SelectorError as e:
                raise ConfigError(f"aggregate.groups entry {g!r} selects no extracted unit "
                                  f"(extract.layers={self.cfg.extract.layers!r}): {e}") from e
        return out

    def groups(self, units) -> list[dict[str, Any]]:
        """All unit groups to evaluate: named, then per block, then per unit (with kind/block/role)."""
        out = [{"group": g, "kind": "group", "units": names, "block": None, "role": None}
               for g, names in self.named_groups(units).items()]
        if self.cfg.aggregate.per_block:
            blocks = sorted({u.block for u in units})
            for b in blocks:
                names = [u.name for u in units if u.block == b]
                out.append({"group": f"block[{b}]", "kind": "block", "units": names, "block": b, "role": "block"})
            for u in units:
                out.append({"group": u.name, "kind": "unit", "units": [u.name], "block": u.block, "role": u.role})
        return out

    def aggregate_all(self, sdir: Path, groups) -> dict[tuple[str, str, str], np.ndarray]:
        """(method, how, group) -> aggregated train scores [N] (lowest = most detrimental).

        One streaming pass per method covers every group and aggregation (``fastinf.aggregate``)."""
        from fastinf.aggregation.aggregate import aggregate_all
        from fastinf.scoring.scores import ScoreSet

        a = self.cfg.aggregate
        out = {}
        for method in self.cfg.score.methods:
            res = aggregate_all(ScoreSet.open(sdir / "scores" / method), how=list(a.how), vote_p=a.vote_p,
                                correct_only=a.correct_only, groups={g["group"]: g["units"] for g in groups})
            for g in groups:
                for how in a.how:
                    out[(method, how, g["group"])] = res.get(g["group"], how)
        return out

    def evaluate_seed(self, seed: int, sdir: Path, stores, groups, mask: np.ndarray) -> list[dict[str, Any]]:
        ndr_at = self.cfg.evaluate.ndr_at
        rows = []
        agg = self.aggregate_all(sdir, groups)
        by_name = {g["group"]: g for g in groups}
        for (method, how, gname), scores in agg.items():
            g = by_name[gname]
            rows.append({"seed": seed, "method": method, "how": how, "group": gname, "kind": g["kind"],
                         "block": g["block"], "role": g["role"], "n_units": len(g["units"]),
                         **evaluate_scores(scores, mask, ndr_at)})
        for b in self.cfg.score.baselines:
            scores = baseline_scores(b, stores["train"], seed)
            rows.append({"seed": seed, "method": b, "how": "-", "group": "-", "kind": "baseline", "block": None,
                         "role": None, "n_units": 0, **evaluate_scores(scores, mask, ndr_at)})
        return rows

    def filter_retrain(self, seed, sdir, noisy_train, test, noise: NoiseResult, stores, groups):
        """Retrain after removing the lowest p% (influence), as many random samples, or the noisy ones."""
        from fastinf.experiment.train import evaluate_model, finetune, load_checkpoint

        cfg, fr = self.cfg, self.cfg.evaluate.filter_retrain
        n = len(noisy_train)
        k = int(round(fr.p / 100 * n))
        if fr.method in ("loss", "random"):
            scores = baseline_scores(fr.method, stores["train"], seed)
        else:
            g = next((g for g in groups if g["group"] == fr.group), None)
            if g is None:
                raise ConfigError(f"evaluate.filter_retrain.group {fr.group!r} is not one of aggregate.groups "
                                  f"({', '.join(cfg.aggregate.groups)})")
            if fr.method not in cfg.score.methods:
                raise ConfigError(f"evaluate.filter_retrain.method {fr.method!r} is not in score.methods")
            from fastinf.aggregation.aggregate import aggregate_all
            from fastinf.scoring.scores import ScoreSet

            res = aggregate_all(ScoreSet.open(sdir / "scores" / fr.method), how=fr.how,
                                vote_p=cfg.aggregate.vote_p, correct_only=cfg.aggregate.correct_only,
                                groups={fr.group: g["units"]})
            scores = res.get(fr.group, fr.how)
        rng = np.random.default_rng(seed + 7919)
        removals = {
            "none": np.array([], dtype=np.int64),
            "influence": np.argsort(scores, kind="stable")[:k],
            "random": rng.choice(n, size=k, replace=False),
            "oracle": np.flatnonzero(noise.mask),
        }
        tcfg = cfg.train if fr.epochs is None else replace(cfg.train, epochs=fr.epochs)
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


def baseline_scores(name: str, train_store, seed: int) -> np.ndarray:
    """``loss``: minus the per-sample training loss (high loss = most detrimental); ``random``: seeded noise."""
    if name == "loss":
        return -np.asarray(train_store.meta.loss, dtype=np.float64)
    if name == "random":
        return np.random.default_rng(seed + 104_729).random(train_store.n)
    raise ConfigError(f"unknown baseline {name!r}; valid: loss, random")


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}[dtype]


def measure_group_costs(model, tokenizer, ds, named_groups: dict[str, list[str]], units, train_store,
                        cfg: RunConfig) -> list[dict[str, Any]]:
    """Per-group extraction cost: the capture of one batch of ``extract.cost_samples`` training samples
    (forward + backward to the group's lowest unit + its projections), restricted to the group's units.

    The same batch is used for every group and for all units; after one warm-up call each is timed
    ``extract.cost_repeats`` times and the fastest kept, the estimate least disturbed by other
    processes on a shared machine.
    """
    import torch

    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector

    ex = cfg.extract
    rows = np.arange(min(ex.cost_samples, len(ds)))
    texts = [ds.texts[i] for i in rows]
    pairs = [ds.text_pairs[i] for i in rows] if ds.text_pairs is not None else None
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=cfg.model.max_length,
                    return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.as_tensor(ds.labels[rows], dtype=torch.long)
    spec = ProjectionSpec.parse(ex.proj, seed=0)
    by_name = {u.name: u for u in units}
    projectors = {u.name: UnitProjector(u, spec, device=torch.device("cpu")) for u in units}

    def fastest(names: list[str]) -> float:
        sel = [by_name[n] for n in names]
        best = float("inf")
        for _ in range(ex.cost_repeats):
            t = time.perf_counter()
            features_for_batch(model, sel, projectors, batch, "seq-cls")
            best = min(best, time.perf_counter() - t)
        return best

    all_names = [u.name for u in units]
    features_for_batch(model, units, projectors, batch, "seq-cls")          # warm-up
    t_all = fastest(all_names)
    itemsize = _itemsize(ex.dtype)
    out = []
    for g, names in named_groups.items():
        t = t_all if sorted(names) == sorted(all_names) else fastest(names)
        dim = int(sum(train_store.feature_dim(n) for n in names))
        out.append({"group": g, "n_units": len(names), "bytes_per_sample": dim * itemsize,
                    "extract_s_per_1k": 1000.0 * t / rows.size, "extract_share": t / t_all if t_all > 0 else None,
                    "feature_dim": dim})
    return out


def _apportion_score_time(costs: list[dict[str, Any]], score_times: dict[str, float], train_store) -> None:
    """Split the measured scoring time of all methods over the groups by feature dimension."""
    total_dim = sum(train_store.feature_dim(n) for n in train_store.unit_names)
    total_s = sum(score_times.values())
    for c in costs:
        c["score_s"] = total_s * c["feature_dim"] / total_dim if total_dim else None


def _mean_costs(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if not per_seed:
        return []
    out = []
    for i, c in enumerate(per_seed[0]):
        d = dict(c)
        for k in ("extract_s_per_1k", "extract_share", "score_s"):
            vals = [s[i][k] for s in per_seed if s[i].get(k) is not None]
            d[k] = float(np.mean(vals)) if vals else None
        out.append(d)
    return out


def _marker_hash(stage_dir: Path, name: str) -> str | None:
    p = _done_path(stage_dir, name)
    return json.loads(p.read_text())["hash"] if p.exists() else None


def _version() -> str:
    from fastinf import __version__

    return __version__


def run_experiment(cfg: RunConfig, out: str | Path | None = None, *, progress: bool = False,
                   echo: Callable[[str], None] | None = None) -> RunResult:
    """Run (or resume) the experiment described by ``cfg``; returns the results and report paths.

    Args:
        cfg: the experiment (validated on construction; see :mod:`fastinf.config`).
        out: output directory (default ``cfg.out``). Stages already done with the same inputs are reused.
        progress: show progress bars for training and extraction.
        echo: receives one-line progress messages (default: the module logger).
    """
    out = Path(out if out is not None else cfg.out)
    runner = _Runner(cfg.validate(), out, progress, echo or log.info)
    return runner.run()
