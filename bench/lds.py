"""LDS benchmark: do layer-wise influence estimates predict what retraining on a subset does?

MiniLM-L6 (packaged) + LoRA r=4/alpha=4 on query/value + head, on SMS spam (400 train / 80 test, 32 tokens),
with label noise off (0%) and on (20%); optionally SST-2 (``../shared/data/glue/SST-2``, 1,000 train / 200
test). For each setting: fine-tune, fit K-FAC factors on the train split, extract all units at random 16x16
(with hidden representations), kfac16x16 and pca16x16, score with graddot, gradcos, if, datainf (random
16x16), kfac (K-FAC-whitened projection), ekfac (eigenbasis projection) and repsim (last / all), then m >= 64
datamodel retrains at
alpha = 0.5 (``fastinf.datamodels``) and the LDS (``fastinf.lds_score`` via per-test aggregation) of every
method for the groups first / middle / last / all under mean / rank / vote, plus the loss, repsim and random
baselines. With noise on, NDR@30 of the same configurations and the rank correlation between NDR@30 and LDS
across them (the paper's claim 3 asks whether NDR tracks retraining outcomes). Wall times of the retrains and
of the scoring are recorded.

Writes ``lds_<task>.json`` and ``lds_<task>.md`` into ``--out-dir`` (default /tmp/fastinf_bench_lds; the
lead writes bench/results). Work directories (stores, scores, retrains: cached, so a rerun resumes) go under
``<out-dir>/work``. Not part of ``make test``.

    python bench/lds.py                         # SMS, m=64, noise off and on (about 30 min on 2 cores)
    python bench/lds.py --task sst2             # SST-2 1,000 / 200
    python bench/lds.py --tiny                  # smoke run: 40 train / 16 test, m=4
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
METHODS = ["graddot", "gradcos", "if", "datainf", "kfac", "ekfac"]
# the store each method scores: random Kronecker 16x16 (with hidden representations for repsim), the K-FAC
# whitened projection for kfac, the eigenbasis projection for ekfac (both from the train split's factors)
PROJECTIONS = ("16x16", "kfac16x16", "pca16x16")
STORE_OF = {"kfac": "kfac16x16", "ekfac": "pca16x16"}
GROUPS = ["first", "middle", "last", "all"]
HOWS = ["mean", "rank", "vote"]


def make_config(task: str, n_train: int, n_test: int, noise: float, out: Path):
    from fastinf.experiment.config import (DataConfig, LoraSettings, ModelConfig, NoiseConfig, RunConfig,
                                           TrainConfig)

    if task == "sms":
        data = DataConfig(train="sms", n_train=n_train, n_test=n_test, split_seed=0, test_fraction=0.15)
        max_length = 32
    else:
        path = GLUE / "SST-2"
        if not (path / "train.tsv").is_file():
            raise SystemExit(f"SST-2 not found at {path}")
        data = DataConfig(train={"path": str(path), "split": "train"}, test={"path": str(path), "split": "dev"},
                          n_train=n_train, n_test=n_test, split_seed=0)
        max_length = 64
    return RunConfig(name=f"lds {task} noise {noise:g}", out=str(out), seeds=[0], data=data,
                     noise=NoiseConfig(rate=noise), model=ModelConfig(name="minilm", max_length=max_length),
                     train=TrainConfig(epochs=1, batch_size=16, lr=5e-3, warmup_ratio=0.1, group_by_length=True,
                                       lora=LoraSettings(r=4, alpha=4.0, target_modules=["query", "value"])))


def prepare(cfg, work: Path):
    """Splits, noise, fine-tune, train/test stores: (noisy_train, test, stores, mask, n_classes)."""
    from fastinf.data.noise import inject_noise
    from fastinf.experiment.splits import load_splits
    from fastinf.experiment.train import finetune, load_checkpoint
    from fastinf.extraction.extract import extract
    from fastinf.store import GradientStore

    train, test = load_splits(cfg)
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    mask = np.zeros(len(train), bool)
    if cfg.noise.rate > 0:
        nz = inject_noise(train.labels, cfg.noise.rate, seed=0, n_classes=n_classes)
        train, mask = train.with_labels(nz.labels), nz.mask
    if not (work / "train" / "train.json").is_file():
        finetune(cfg.model, cfg.train, train, test, work / "train", seed=0, n_classes=n_classes)
    from fastinf.experiment.train import TrainResult

    model, tok = load_checkpoint(TrainResult.load(work / "train").best.path)
    factors = _factors(model, tok, train, work / "factors", cfg.model.max_length)
    stores = {}
    for proj in PROJECTIONS:
        spec = proj if proj == "16x16" else f"{proj}@{factors}"
        for split, ds in (("train", train), ("test", test)):
            path = work / "stores" / proj / split
            if not (path / "manifest.json").is_file():
                extract(model, tok, ds, path, layers="all", proj=spec, dtype="float16", batch_size=32,
                        max_length=cfg.model.max_length, progress=False, overwrite=True, reps=proj == "16x16")
            stores[proj, split] = GradientStore.open(path)
    return train, test, stores, mask, n_classes


def _factors(model, tok, train, out: Path, max_length: int) -> Path:
    """K-FAC factors of every unit, fitted on the (noisy) train split only, once (cached)."""
    from fastinf.extraction.factors import fit_factors

    if not (out / "manifest.json").is_file():
        fit_factors(model, tok, train, out, layers="all", max_length=max_length, batch_size=32, progress=False,
                    overwrite=out.exists())
    return out


def score_all(stores, work: Path) -> tuple[dict, dict, dict]:
    """ScoreSets per method that this build scores from these stores; times; skipped methods and why."""
    from fastinf.errors import FastinfError
    from fastinf.scoring.estimators import score

    sets, times, skipped = {}, {}, {}
    for method in METHODS + ["repsim"]:
        t0 = time.perf_counter()
        try:
            proj = STORE_OF.get(method, "16x16")
            sets[method] = score(stores[proj, "test"], stores[proj, "train"], method=method,
                                 out=work / "scores" / method, overwrite=True)
            times[method] = time.perf_counter() - t0
        except FastinfError as e:
            skipped[method] = str(e).split("\n")[0][:160]
    return sets, times, skipped


def lds_rows(sets, stores, truth, mask) -> list[dict]:
    """LDS (and NDR@30 with noise) of every (method, group, how) and of the baselines."""
    from fastinf.aggregation.aggregate import aggregate_all
    from fastinf.aggregation.evaluate import ndr
    from fastinf.aggregation.lds import lds_of_aggregations, lds_score

    rows = []
    for method, s in sets.items():
        # repsim's pseudo-units are the embedding output and each block's output: RepSim-last and -all
        groups = GROUPS if method != "repsim" else {"last": s.unit_names[-1], "all": "all"}
        res = lds_of_aggregations(s, truth.subsets, truth.margins, HOWS, groups=groups)
        agg = aggregate_all(s, HOWS, groups=groups) if mask.any() else None
        for (g, how), v in res.items():
            row = {"method": method, "group": g, "how": how, **v.as_dict()}
            if agg is not None:
                row["ndr@30"] = float(ndr(agg.get(g, how), mask, at=30))
            rows.append(row)
    for name, tau in (("loss", -np.asarray(stores["16x16", "train"].meta.loss, np.float64)),
                      ("random", np.random.default_rng(0).random(stores["16x16", "train"].n))):
        row = {"method": name, "group": "-", "how": "-", **lds_score(tau, truth.subsets, truth.margins).as_dict()}
        if mask.any():
            row["ndr@30"] = float(ndr(tau, mask, at=30))
        rows.append(row)
    return rows


def run_setting(task: str, n_train: int, n_test: int, noise: float, m: int, workers: int, root: Path) -> dict:
    from fastinf.experiment.datamodels import datamodels

    work = root / "work" / f"{task}_n{n_train}_noise{int(noise * 100)}"
    cfg = make_config(task, n_train, n_test, noise, work)
    t0 = time.perf_counter()
    train, test, stores, mask, n_classes = prepare(cfg, work)
    t_prep = time.perf_counter() - t0
    sets, score_s, skipped = score_all(stores, work)
    t0 = time.perf_counter()
    truth = datamodels(cfg.model, cfg.train, train, test, work / "datamodels", m=m, alpha=0.5, seed=0, train_seed=0,
                       workers=workers, n_classes=n_classes, echo=print)
    t_retrain = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = lds_rows(sets, stores, truth, mask)
    t_lds = time.perf_counter() - t0
    out = {"task": task, "noise": noise, "n_train": len(train), "n_test": len(test), "m": m, "alpha": 0.5,
           "rows": rows, "skipped": skipped, "seconds": {"prepare": t_prep, "score": score_s,
                                                        "retrains": t_retrain, "lds": t_lds}}
    if mask.any():
        out["ndr_vs_lds_spearman"] = _agreement(rows)
    return out


def _agreement(rows: list[dict]) -> float:
    """Spearman, across the (method, group, how) configurations, between NDR@30 and LDS."""
    from fastinf.aggregation.lds import spearman_columns

    pts = [(r["ndr@30"], r["lds"]) for r in rows if r["group"] != "-" and np.isfinite(r["lds"])]
    if len(pts) < 3:
        return float("nan")
    a = np.array(pts)
    return float(spearman_columns(a[:, :1], a[:, 1:])[0])


def write_md(results: list[dict], path: Path, wall: float) -> None:
    lines = [f"# LDS benchmark ({results[0]['task']})", "",
             f"MiniLM-L6 + LoRA, m = {results[0]['m']} subsets at alpha = 0.5; host {platform.node()}, "
             f"{wall:.0f} s in all. LDS = mean over test samples of the Spearman correlation (over subsets) "
             "between the retrained margin and the subset's summed scores; 95% CI by bootstrap over tests.", ""]
    for res in results:
        lines += [f"## noise {100 * res['noise']:.0f}% ({res['n_train']} train / {res['n_test']} test)", ""]
        head = "| method | group | how | LDS | 95% CI |" + (" NDR@30 |" if res["noise"] else "")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in res["rows"]:
            cell = f"| {r['method']} | {r['group']} | {r['how']} | {r['lds']:.3f} | [{r['lds_low']:.3f}, {r['lds_high']:.3f}] |"
            lines.append(cell + (f" {r['ndr@30']:.3f} |" if res["noise"] else ""))
        sec = res["seconds"]
        lines += ["", f"Wall time: retrains {sec['retrains']:.0f} s, scoring "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in sec["score"].items()) + f", LDS {sec['lds']:.1f} s."]
        if res["skipped"]:
            lines.append("Not scored: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()))
        if "ndr_vs_lds_spearman" in res:
            lines.append(f"Across configurations, Spearman(NDR@30, LDS) = {res['ndr_vs_lds_spearman']:.3f}.")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["sms", "sst2"], default="sms")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 40 train / 16 test, m=4, noise on only")
    ap.add_argument("--m", type=int, default=None, help="subsets (default 64; tiny: 4)")
    ap.add_argument("--workers", type=int, default=1, help="parallel retrain processes")
    ap.add_argument("--out-dir", default="/tmp/fastinf_bench_lds")
    ap.add_argument("--noise", type=float, nargs="+", default=None, help="noise rates (default: 0 and 0.2)")
    args = ap.parse_args(argv)
    sizes = {"sms": (400, 80), "sst2": (1000, 200)}[args.task]
    if args.tiny:
        sizes = (40, 16)
    m = args.m or (4 if args.tiny else 64)
    root = Path(args.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [run_setting(args.task, *sizes, noise, m, args.workers, root)
               for noise in (args.noise or ((0.2,) if args.tiny else (0.0, 0.2)))]
    wall = time.perf_counter() - t0
    (root / f"lds_{args.task}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    write_md(results, root / f"lds_{args.task}.md", wall)
    print(f"wrote {root / f'lds_{args.task}.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
