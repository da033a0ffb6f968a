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
- the baselines that need no gradients (loss, random, label prior) and where influence beats the best;
- claim **3** (NDR predicts retrained accuracy better than the cancellation ratio) from the retrain grid
  (``evaluate.retrain_grid``; ``--retrain-grid`` enables its default grid), and over all the configs given, a
  Friedman test of Mean/Rank/Vote over (task, seed, method, group) blocks with the Nemenyi CD.

The verdict logic is :mod:`fastinf.experiment.claims` (what ``fastinf run`` prints too); this script adds the
multi-config view and the files.

    python bench/paper.py configs/paper_sst2.yaml configs/paper_mrpc.yaml --seeds 0,1,2
    python bench/paper.py my.yaml --retrain-grid --results-dir /tmp/paper --allow-unlearned
    python bench/paper.py --task sst2 --quick           # configs/paper_<task>.yaml, 1 seed, small: a smoke run

A model that does not beat the majority class stops the run (``evaluate.require_learned``); the report then
says so and the script exits 3, unless ``--allow-unlearned``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


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
    if args.retrain_grid:
        cfg.evaluate.retrain_grid.enabled = True


def load_config(path: Path, args) -> Any:
    """The RunConfig of ``path`` (relative paths resolved from the repository root) with the overrides."""
    from fastinf.experiment.config import RunConfig

    cfg = RunConfig.from_yaml(path)
    _overrides(cfg, args)
    if args.quick or any(getattr(args, a) is not None for a in ("seeds", "n_train", "n_test", "epochs")):
        cfg.out = str(Path(cfg.out).with_name(Path(cfg.out).name + "_reduced"))
    return cfg.validate()


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
    from fastinf.experiment.claims import baseline_lines, baselines_vs_influence, claim3, claim_lines, claims

    metrics = ["ndr@30"] + (["bal_ndr@30"] if any("bal_ndr@30" in r for r in rows) else [])
    all_claims = [c for m in metrics for c in claims(rows, m)]
    all_claims.append(claim3(results.get("retrain_grid") or [], results.get("lds"),
                             n_boot=cfg.evaluate.retrain_grid.n_boot))
    base = [baselines_vs_influence(rows, m) for m in metrics + ["auc_ndr"]]
    md = [f"# Paper protocol: {cfg.name}", "", f"Config hash `{results['config_hash']}`; seeds {cfg.seeds}; "
          f"{len(rows)} metric rows; stage time {sum(results['timings'].values()) / 60:.1f} min (this invocation "
          f"{seconds / 60:.1f} min) on {os.cpu_count()} CPU cores (load {os.getloadavg()[0]:.1f}).", "",
          "## Did the model learn?", ""] + _accuracy_lines(results) + ["", "## Claims", ""]
    md += [f"**{ln}**\n" for ln in claim_lines({"claims": all_claims})]
    md += ["## Baselines", ""] + [ln for b in base for ln in baseline_lines(b) + [""]]
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


def write_across(rows_by_task: dict[str, list[dict]], results_dir: Path) -> Path:
    """Mean/Rank/Vote over every config's (task, seed, method, group) blocks: Friedman, Nemenyi CD, Wilcoxon."""
    from fastinf.experiment.claims import aggregation_tests, claim_lines

    tests = aggregation_tests(rows_by_task, "ndr@30")
    lines = claim_lines({"claims": [], "aggregation_tests": tests}) or [f"Aggregations: {tests.get('verdict')}"]
    if "wilcoxon_p" in tests:
        lines.append("Wilcoxon signed-rank p: " + ", ".join(f"{k} {v:.3g}" for k, v in tests["wilcoxon_p"].items()))
    out = results_dir / "paper_across_tasks.md"
    results_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Across {', '.join(rows_by_task)}\n\n" + "\n\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(tests, indent=1, default=str) + "\n")
    return out


def run_one(path: Path, args, rows_by_task: dict[str, list[dict]] | None = None) -> int:
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
    if rows_by_task is not None:
        rows_by_task[name] = res.results["rows"]
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", type=Path, help="fastinf run configs (any path)")
    ap.add_argument("--config", action="append", type=Path, default=[], help="a fastinf run config (repeatable)")
    ap.add_argument("--retrain-grid", action="store_true", help="evaluate.retrain_grid.enabled: true (claim 3)")
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
    configs = [p.resolve() for p in [*args.configs, *args.config]] + [REPO / "configs" / f"paper_{t}.yaml"
                                                                       for t in tasks]
    if not configs:
        ap.error("give CONFIG paths (or --config CONFIG, repeatable, or --task)")
    args.results_dir = args.results_dir.resolve()
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    os.chdir(REPO)                                 # the configs' relative paths start at the repository root
    rows_by_task: dict[str, list[dict]] = {}
    code = max([run_one(p, args, rows_by_task) for p in configs])
    if len(rows_by_task) > 1:
        print(write_across(rows_by_task, args.results_dir).read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
