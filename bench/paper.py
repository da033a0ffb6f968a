"""The paper's protocol (Vitel & Chhabra, ICLR 2026) on any `fastinf run` config: does it reproduce here?

Runs (or resumes) each config with ``fastinf.experiment.pipeline.run_experiment`` — the label-prior
baseline is added to ``score.baselines`` when missing — and writes, per config,
``<results-dir>/paper_<name>.md`` and ``.json``:

- held-out accuracy per seed against the majority-class rate (the learned-or-refuse verdict of the run);
- the claims, each with counts and a 95% CI: **1** middle layers beat the first (embedding) layer, over
  (method, aggregation) cells; **2a / 2b** Rank / Vote beat Mean, over (method, group) cells. A cell's
  value is its paired difference averaged over seeds; the verdict is "holds" when the bootstrap CI of the
  mean difference over cells lies above 0, "does not hold" below 0, else "inconclusive"; a sign test over
  cells is given too. Each claim on NDR@30 and, where the run has it, on class-balanced NDR@30;
- the baselines that need no gradients (loss, random, label prior) and where influence beats the best.

    python bench/paper.py --config configs/paper_sst2.yaml --config configs/paper_mrpc.yaml
    python bench/paper.py --task sst2 --quick           # configs/paper_<task>.yaml, 1 seed, small: a smoke run
    python bench/paper.py --config my.yaml --results-dir /tmp/paper --allow-unlearned

A model that does not beat the majority class stops the run (``evaluate.require_learned``); the report then
says so and the script exits 3, unless ``--allow-unlearned``. Claim 3 (NDR predicts retrained accuracy
better than the cancellation ratio) needs the retraining grid, which this script does not run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOWS = ("mean", "rank", "vote")


def _overrides(cfg, args) -> None:
    """Apply the command line's size / seed / recipe overrides (a reduced run) to ``cfg`` in place."""
    if args.quick:
        cfg.seeds, cfg.data.n_train, cfg.data.n_test, cfg.train.epochs = [0], 600, 100, 1
    if args.seeds:
        cfg.seeds = [int(s) for s in args.seeds.split(",")]
    for attr, section, key in (("n_train", "data", "n_train"), ("n_test", "data", "n_test"),
                               ("epochs", "train", "epochs"), ("max_length", "model", "max_length"),
                               ("lr", "train", "lr")):
        if getattr(args, attr) is not None:
            setattr(getattr(cfg, section), key, getattr(args, attr))
    if "label_prior" not in cfg.score.baselines:
        cfg.score.baselines = list(cfg.score.baselines) + ["label_prior"]
    if args.allow_unlearned:
        cfg.evaluate.require_learned = False


def load_config(path: Path, args) -> Any:
    """The RunConfig of ``path`` (relative paths resolved from the repository root) with the overrides."""
    from fastinf.experiment.config import RunConfig

    cfg = RunConfig.from_yaml(path)
    _overrides(cfg, args)
    if args.quick or any(getattr(args, a) is not None for a in ("seeds", "n_train", "n_test", "epochs")):
        cfg.out = str(Path(cfg.out).with_name(Path(cfg.out).name + "_reduced"))
    return cfg.validate()


# ----------------------------------------------------------------------------------------------- claims
def _index(rows: list[dict], metric: str) -> dict[tuple, float]:
    """(method, how, group, seed) -> metric, for the named unit groups."""
    return {(r["method"], r["how"], r["group"], r["seed"]): r[metric] for r in rows
            if r.get("kind") == "group" and r.get(metric) is not None and not np.isnan(r[metric])}


def _cell_diffs(idx: dict[tuple, float], pairs: list[tuple[tuple, tuple]], seeds: list[int]) -> list[float]:
    """Per cell (a pair of (method, how, group) keys): the paired difference a - b averaged over seeds."""
    out = []
    for a, b in pairs:
        d = [idx[(*a, s)] - idx[(*b, s)] for s in seeds if (*a, s) in idx and (*b, s) in idx]
        if d:
            out.append(float(np.mean(d)))
    return out


def _bootstrap_ci(values: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def claim(name: str, text: str, diffs: list[float]) -> dict[str, Any]:
    """Counts, mean paired difference, its bootstrap 95% CI, a two-sided sign test and the verdict."""
    from fastinf.experiment.learned import binomial_sf

    d = np.asarray(diffs, np.float64)
    if d.size == 0:
        return {"claim": name, "text": text, "cells": 0, "verdict": "not testable (the run lacks these cells)"}
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = _bootstrap_ci(d)
    k = max(wins, losses)
    p_sign = min(1.0, 2 * binomial_sf(k, wins + losses, 0.5)) if wins + losses else 1.0
    verdict = "holds" if lo > 0 else ("does not hold" if hi < 0 else "inconclusive")
    return {"claim": name, "text": text, "cells": int(d.size), "wins": wins, "losses": losses,
            "mean_diff": float(d.mean()), "ci95": [lo, hi], "p_sign": p_sign, "verdict": verdict}


def claims(rows: list[dict], metric: str) -> list[dict[str, Any]]:
    """Claims 1, 2a and 2b on ``metric`` from the per-seed metric rows."""
    idx = _index(rows, metric)
    seeds = sorted({k[3] for k in idx})
    methods = sorted({k[0] for k in idx})
    groups = sorted({k[2] for k in idx})
    hows = sorted({k[1] for k in idx})
    out = [claim("1", "middle layers beat the first (embedding) layer",
                 _cell_diffs(idx, [((m, h, "middle"), (m, h, "first")) for m in methods for h in hows], seeds))]
    for tag, alt in (("2a", "rank"), ("2b", "vote")):
        pairs = [((m, alt, g), (m, "mean", g)) for m in methods for g in groups]
        out.append(claim(tag, f"{alt.capitalize()} beats Mean", _cell_diffs(idx, pairs, seeds)))
    for c in out:
        c["metric"] = metric
    return out


def _claim_line(c: dict[str, Any]) -> str:
    head = f"**Claim {c['claim']} — {c['text']} ({c['metric']}): {c['verdict']} here**"
    if not c["cells"]:
        return head + "."
    lo, hi = c["ci95"]
    return (f"{head} — better in {c['wins']} of {c['cells']} cells (worse in {c['losses']}); mean paired "
            f"difference {c['mean_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]; sign test p = {c['p_sign']:.3g}.")


# -------------------------------------------------------------------------------------------- baselines
def _mean_std(rows: list[dict], metric: str, **key: Any) -> tuple[float, float, int]:
    vals = [r[metric] for r in rows if all(r.get(k) == v for k, v in key.items())
            and r.get(metric) is not None and not np.isnan(r[metric])]
    if not vals:
        return float("nan"), 0.0, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def baselines_vs_influence(rows: list[dict], metric: str) -> dict[str, Any]:
    """Each baseline's mean ± std; the best influence cell; how many cells beat the best baseline."""
    base = {m: _mean_std(rows, metric, method=m, kind="baseline")
            for m in sorted({r["method"] for r in rows if r.get("kind") == "baseline"})}
    cells = {(r["method"], r["how"], r["group"]) for r in rows if r.get("kind") == "group"}
    means = {c: _mean_std(rows, metric, method=c[0], how=c[1], group=c[2], kind="group") for c in cells}
    means = {c: v for c, v in means.items() if v[2]}
    best_base = max(base.items(), key=lambda kv: kv[1][0]) if base else None
    best_cell = max(means.items(), key=lambda kv: kv[1][0]) if means else None
    beat = sum(v[0] > best_base[1][0] for v in means.values()) if best_base else 0
    return {"metric": metric, "baselines": {m: list(v) for m, v in base.items()},
            "best_baseline": best_base[0] if best_base else None,
            "best_cell": list(best_cell[0]) if best_cell else None,
            "best_cell_value": list(best_cell[1]) if best_cell else None,
            "cells_beating_best_baseline": int(beat), "cells": len(means)}


def _baseline_lines(b: dict[str, Any]) -> list[str]:
    from fastinf.experiment.summary import fmt_mean_std

    if not b["baselines"] or b["best_cell"] is None:
        return [f"({b['metric']}: no baselines or no influence cells in this run.)"]
    bl = ", ".join(f"{m} {fmt_mean_std(*v)}" for m, v in b["baselines"].items())
    m, h, g = b["best_cell"]
    best = fmt_mean_std(*b["best_cell_value"])
    return [f"Baselines ({b['metric']}, mean ± std over seeds): {bl}.",
            f"Best influence cell: `{g}` with {m}/{h}, {best}; {b['cells_beating_best_baseline']} of "
            f"{b['cells']} (method, aggregation, group) cells beat the best baseline ({b['best_baseline']})."]


# ------------------------------------------------------------------------------------------------ report
def _accuracy_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for t in results["train"]:
        v = t.get("learned")
        if v:
            lines.append(f"- seed {t['seed']}: held-out accuracy {v['accuracy']:.3f} vs majority {v['majority']:.3f} "
                         f"(n={v['n']}, binomial p={v['p_binomial']:.3g}): **{v['verdict']}**")
        else:
            lines.append(f"- seed {t['seed']}: held-out accuracy {t['heldout_acc']:.3f} (no learned check recorded)")
    return lines


def write_outputs(name: str, cfg, res, seconds: float, results_dir: Path) -> Path:
    """The markdown verdicts and a compact JSON of one config's run."""
    results = res.results
    rows = results["rows"]
    metrics = ["ndr@30"] + (["bal_ndr@30"] if any("bal_ndr@30" in r for r in rows) else [])
    all_claims = [c for m in metrics for c in claims(rows, m)]
    base = [baselines_vs_influence(rows, m) for m in metrics + ["auc_ndr"]]
    md = [f"# Paper protocol: {cfg.name}", "", f"Config hash `{results['config_hash']}`; seeds {cfg.seeds}; "
          f"{len(rows)} metric rows; stage time {sum(results['timings'].values()) / 60:.1f} min (this invocation "
          f"{seconds / 60:.1f} min) on {os.cpu_count()} CPU cores (load {os.getloadavg()[0]:.1f}).", "",
          "## Did the model learn?", ""] + _accuracy_lines(results) + ["", "## Claims", ""]
    md += [_claim_line(c) + "\n" for c in all_claims]
    md += ["## Baselines", ""] + [ln for b in base for ln in _baseline_lines(b) + [""]]
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"paper_{name}.md"
    out.write_text("\n".join(md) + "\n")
    compact = {"name": name, "config": results["config"], "config_hash": results["config_hash"],
               "seconds": seconds, "train": results["train"], "claims": all_claims, "baselines": base}
    out.with_suffix(".json").write_text(json.dumps(compact, indent=1, default=str) + "\n")
    return out


def write_refusal(name: str, cfg, err: Exception, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"paper_{name}.md"
    out.write_text(f"# Paper protocol: {cfg.name}\n\n**Not evaluated:** {err}\n\nNo claim is tested on a model "
                   "that did not learn (rerun with --allow-unlearned to see the numbers anyway).\n")
    return out


def run_one(path: Path, args) -> int:
    from fastinf.experiment.learned import NotLearnedError
    from fastinf.experiment.pipeline import run_experiment

    cfg = load_config(path, args)
    name = Path(cfg.out).name
    t0 = time.perf_counter()
    echo = lambda m: print(f"[{name} {time.perf_counter() - t0:7.1f}s] {m}", flush=True)  # noqa: E731
    try:
        res = run_experiment(cfg, out=args.out or cfg.out, echo=echo)
    except NotLearnedError as e:
        print(write_refusal(name, cfg, e, args.results_dir).read_text())
        return 3
    print(write_outputs(name, cfg, res, time.perf_counter() - t0, args.results_dir).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", type=Path, default=[], help="a fastinf run config (repeatable)")
    ap.add_argument("--task", choices=["sst2", "mrpc", "both"], default=None,
                    help="shortcut for --config configs/paper_<task>.yaml")
    ap.add_argument("--quick", action="store_true", help="1 seed, 600 train / 100 test samples, 1 epoch")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: the config's out)")
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--allow-unlearned", action="store_true", help="evaluate.require_learned: false")
    args = ap.parse_args(argv)
    tasks = {"sst2": ["sst2"], "mrpc": ["mrpc"], "both": ["sst2", "mrpc"]}.get(args.task or "", [])
    configs = [p.resolve() for p in args.config] + [REPO / "configs" / f"paper_{t}.yaml" for t in tasks]
    if not configs:
        ap.error("give --config CONFIG (repeatable) or --task")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    os.chdir(REPO)                                 # the configs' relative paths start at the repository root
    return max(run_one(p, args) for p in configs)


if __name__ == "__main__":
    sys.exit(main())
