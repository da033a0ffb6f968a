"""The paper's protocol (Vitel & Chhabra, ICLR 2026) on real GLUE data: does it reproduce here?

MiniLM-L6 (packaged), LoRA r=4 / alpha=4 on query+value plus the head; 4,500 SST-2 training sentences
(MRPC: all 3,668 pairs); 20% uniform label noise; influence set = a random half of the validation set;
3 seeds. NDR@30 and AUC_NDR for graddot, gradcos, datainf, if (+ the loss and random baselines) over
the unit groups first (embedding), middle, q1..q4, last (head), all, each with Mean, Rank and Vote.

Writes ``bench/results/paper_<task>.md`` (tables and, claim by claim, whether the paper's findings
hold: *middle beats first*, *Rank/Vote beat Mean*) and ``paper_<task>.json``. The full run writes its
stages under ``runs/paper_<task>`` (cached: re-running resumes). Not part of ``make test``.

    python bench/paper.py                  # both tasks, full protocol (about an hour on 2 cores)
    python bench/paper.py --quick          # 1 seed, 600 train samples, 1 epoch: a smoke run
    python bench/paper.py --task mrpc --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
TASKS = {
    # task: (directory, train samples (None = all), validation size, max_length)
    "sst2": ("SST-2", 4500, 872, 64),
    "mrpc": ("MRPC", None, 408, 128),
}
GROUPS = ["first", "middle", "q1", "q2", "q3", "q4", "last", "all"]
METHODS = ["graddot", "gradcos", "datainf", "if"]
HOWS = ["mean", "rank", "vote"]


def make_config(task: str, *, quick: bool, seeds: list[int], out: Path, n_train: int | None = None,
                n_test: int | None = None, epochs: int | None = None, max_length: int | None = None,
                lr: float = 5e-3):
    from fastinf.experiment.config import (AggregateConfig, DataConfig, ExtractConfig, LoraSettings, ModelConfig,
                                NoiseConfig, RunConfig, ScoreConfig, TrainConfig)

    folder, full_train, n_dev, full_length = TASKS[task]
    n_train = n_train or (600 if quick else full_train)
    n_test = n_test or (100 if quick else n_dev // 2)
    max_length = max_length or full_length
    epochs = epochs or (1 if quick else 3)
    path = GLUE / folder
    if not (path / "train.tsv").is_file():
        sys.exit(f"GLUE data not found at {path}; expected train.tsv and dev.tsv (see shared/data/glue/README.md)")
    return RunConfig(
        name=f"paper protocol: {task.upper()}" + (" (quick)" if quick else ""),
        out=str(out),
        seeds=seeds,
        data=DataConfig(train={"path": str(path), "split": "train"}, test={"path": str(path), "split": "dev"},
                        n_train=n_train, n_test=n_test, split_seed=0),
        noise=NoiseConfig(rate=0.2),
        model=ModelConfig(name="minilm", max_length=max_length),
        train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_ratio=0.1, group_by_length=True,
                          lora=LoraSettings(r=4, alpha=4.0, target_modules=["query", "value"])),
        extract=ExtractConfig(layers="all", proj="16x16", batch_size=32, cost_samples=32, cost_repeats=2),
        score=ScoreConfig(methods=METHODS[:3] if quick else METHODS),
        aggregate=AggregateConfig(how=HOWS, groups=GROUPS),
    )


def _get(summary, method, how, group, metric="ndr@30"):
    for s in summary:
        if (s["method"], s["how"], s["group"], s["kind"]) == (method, how, group, "group"):
            return s[f"{metric}_mean"], s[f"{metric}_std"], s["n_seeds"]
    return None


def claims(summary, methods) -> list[str]:
    """Claim-by-claim verdicts with the numbers behind them."""
    from fastinf.experiment.report import fmt_mean_std

    lines = []
    # 1. middle beats first
    wins, total, detail = 0, 0, []
    for m in methods:
        for h in HOWS:
            a, b = _get(summary, m, h, "middle"), _get(summary, m, h, "first")
            if a is None or b is None:
                continue
            total += 1
            wins += a[0] > b[0]
            detail.append(f"{m}/{h}: middle {fmt_mean_std(*a)} vs first {fmt_mean_std(*b)}")
    verdict = "holds" if wins > total / 2 else ("does not hold" if wins < total / 2 else "is a tie")
    lines.append(f"**Claim 1 — middle layers beat the first (embedding) layer: {verdict} here** "
                 f"(middle > first in {wins} of {total} method/aggregation pairs, NDR@30).")
    lines += [""] + [f"- {d}" for d in detail] + [""]
    # 2. rank / vote beat mean
    for alt in ("rank", "vote"):
        wins, total, detail = 0, 0, []
        for m in methods:
            for g in GROUPS:
                a, b = _get(summary, m, alt, g), _get(summary, m, "mean", g)
                if a is None or b is None:
                    continue
                total += 1
                wins += a[0] > b[0]
                if g in ("middle", "all"):
                    detail.append(f"{m}/{g}: {alt} {fmt_mean_std(*a)} vs mean {fmt_mean_std(*b)}")
        verdict = "holds" if wins > total / 2 else ("does not hold" if wins < total / 2 else "is a tie")
        lines.append(f"**Claim 2{'a' if alt == 'rank' else 'b'} — {alt.capitalize()} beats Mean: {verdict} here** "
                     f"({alt} > mean in {wins} of {total} method/group pairs, NDR@30; examples below).")
        lines += [""] + [f"- {d}" for d in detail] + [""]
    groups = [s for s in summary if s["kind"] == "group" and s["method"] in methods]
    best = max(groups, key=lambda s: s["ndr@30_mean"])
    lines.append(f"**Best overall here:** `{best['group']}` with {best['method']}/{best['how']} "
                 f"(NDR@30 {fmt_mean_std(best['ndr@30_mean'], best['ndr@30_std'], best['n_seeds'])}); the `loss` "
                 "baseline: " + ", ".join(fmt_mean_std(s["ndr@30_mean"], s["ndr@30_std"], s["n_seeds"])
                                         for s in summary if s["method"] == "loss") + ".")
    return lines


def write_outputs(task: str, res, quick: bool, seconds: float, load: tuple[float, float, float]) -> Path:
    from fastinf.experiment.report import fmt_mean_std

    results = res.results
    summary = results["summary"]
    methods = results["config"]["score"]["methods"]
    md = [f"# Paper protocol on {TASKS[task][0]}" + (" (quick smoke run)" if quick else ""), ""]
    d, t = results["config"]["data"], results["config"]["train"]
    folder, full_train, n_dev, _ = TASKS[task]
    deviations = []
    if (d["n_train"] or 0) != (full_train or 0) and not (full_train is None and d["n_train"] is None):
        deviations.append(f"{d['n_train']} training samples instead of {full_train or 'all 3,668'}")
    if d["n_test"] != n_dev // 2:
        deviations.append(f"{d['n_test']} influence-set samples instead of {n_dev // 2}")
    if len(results["setup"]["seeds"]) != 3:
        deviations.append(f"{len(results['setup']['seeds'])} seed(s) instead of 3")
    if t["epochs"] != 3:
        deviations.append(f"{t['epochs']} epoch(s) instead of 3")
    if deviations:
        md += ["**Reduced protocol** (the CPU budget of this run did not allow the full one): "
               + "; ".join(deviations) + ". Conclusions below are about this reduced setting only; "
               "`python bench/paper.py` runs the full protocol.", ""]
    md.append("Setup: " + ", ".join(f"{k}: {v}" for k, v in results["setup"].items() if k != "chance") + ".")
    md.append(f"Chance: NDR@30 ≈ {results['setup']['chance']['ndr@30']:.3f}, AUC_NDR ≈ "
              f"{results['setup']['chance']['auc_ndr']:.3f}. Fine-tuned held-out accuracy per seed: "
              + ", ".join(f"{t['heldout_acc']:.3f} (epoch {t['best_epoch']})" for t in results["train"]) + ".")
    from fastinf.store import GradientStore

    for t in results["train"]:
        labels = np.asarray(GradientStore.open(Path(res.out) / f"seed-{t['seed']}" / "stores" / "test").meta.label)
        majority = np.bincount(labels).max() / labels.size
        if t["heldout_acc"] <= majority + 0.02:
            md.append(f"**Caveat (seed {t['seed']}):** the fine-tuned model's held-out accuracy "
                      f"({t['heldout_acc']:.3f}) does not beat the majority class ({majority:.3f}): it has barely "
                      "learned the task, so these influence scores describe an under-trained model.")
    md.append(f"Stage time {sum(results['timings'].values()) / 60:.1f} min (this invocation {seconds / 60:.1f} min; "
              f"cached stages are reused) on {os.cpu_count()} CPU cores shared with other jobs "
              f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}); full report: "
              f"`{Path(res.report.markdown).relative_to(REPO)}` (not committed).")
    md.append("")
    md += claims(summary, methods)
    md.append("")
    for metric in ("ndr@30", "auc_ndr"):
        md.append(f"## {metric} (mean ± std over seeds)")
        md.append("")
        md.append("| method / aggregation | " + " | ".join(GROUPS) + " |")
        md.append("|---|" + "---|" * len(GROUPS))
        for m in methods:
            for h in HOWS:
                cells = []
                for g in GROUPS:
                    v = _get(summary, m, h, g, metric)
                    cells.append(fmt_mean_std(*v) if v else "")
                md.append(f"| {m} / {h} | " + " | ".join(cells) + " |")
        md.append("")
        md.append("Baselines (one score per sample, no layers): " + ", ".join(
            f"{s['method']} {fmt_mean_std(s[f'{metric}_mean'], s[f'{metric}_std'], s['n_seeds'])}"
            for s in summary if s["kind"] == "baseline") + ".")
        md.append("")
    rec = results.get("recommendation")
    if rec:
        r = rec["recommended"]
        md.append(f"Recommended layers (best NDR@30 lift per unit of extraction cost): `{r['group']}` "
                  f"({r['method']}/{r['how']}, NDR@30 {r['quality']:.3f} at {100 * r['cost_share']:.0f}% of the "
                  "all-unit extraction cost).")
    out = REPO / "bench" / "results" / f"paper_{task}{'_quick' if quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    compact = {"task": task, "quick": quick, "seconds": seconds, "load_average": load, "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "config_hash": results["config_hash"],
               "setup": results["setup"], "train": results["train"], "costs": results["costs"],
               "summary": [s for s in summary if s["kind"] in ("group", "baseline")]}
    out.with_suffix(".json").write_text(json.dumps(compact, indent=1, default=str) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["sst2", "mrpc", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="1 seed, 600 train / 100 test samples, 1 epoch")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--n-train", type=int, default=None, help="override the training-set size (a reduced run)")
    ap.add_argument("--n-test", type=int, default=None, help="override the influence-set size")
    ap.add_argument("--epochs", type=int, default=None, help="override the number of epochs (default 3)")
    ap.add_argument("--max-length", type=int, default=None, help="override the token limit")
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from fastinf.experiment.pipeline import run_experiment

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    for task in (["sst2", "mrpc"] if args.task == "both" else [args.task]):
        out = REPO / "runs" / f"paper_{task}{'_quick' if args.quick else ''}"
        cfg = make_config(task, quick=args.quick, seeds=seeds, out=out, n_train=args.n_train, n_test=args.n_test,
                          epochs=args.epochs, max_length=args.max_length, lr=args.lr)
        t0 = time.perf_counter()
        res = run_experiment(cfg, echo=lambda m: print(f"[{task} {time.perf_counter() - t0:7.1f}s] {m}", flush=True))
        path = write_outputs(task, res, args.quick, time.perf_counter() - t0, os.getloadavg())
        print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
