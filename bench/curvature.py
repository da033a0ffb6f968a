"""Curvature-aware projections benchmark (a script, not a test): MiniLM-L6 on SMS spam, all linear units.

One run, factors fitted on the TRAIN rows only (``fastinf.fit_factors``), then per unit from one capture of
raw ``(x, g)`` over the test + train rows:

* ``fidelity`` (graddot) - random 16x16 (``kron``), ``pca16x16`` (eigenbasis) and ``pcamix16x16`` (top 8 +
  random complement), all 256 features per unit (equal bytes), against exact GradDot in float64;
* ``curvature`` - ``kfac`` (16x16, 64x64) against the dense full-space float64 K-FAC influence
  ``vec(∇W_q)ᵀ(A_λ⁻¹⊗S_λ⁻¹)vec(∇W_g)``, and ``ekfac`` (pca 16x16 / 64x64 + Λ = E[φ²] from the train rows)
  against the dense EK-FAC influence (Λ from the full eigen-coordinates of the train gradients);
  the random-16x16 GradDot ranking against dense EK-FAC is reported beside them (what curvature changes).

Exact references are the full-rank eigen-coordinates ``U_Sᵀ ∇W̃ U_A`` of every per-sample gradient in float64
(an orthogonal change of basis of ``∇W̃ = [∇W, ∇b]``: its inner products are GradDot's; checked against the
directly formed gradients on one unit). Metrics (``bench/extract.py``'s): flattened Spearman and per-test
top-10 overlap of the sum over units, per-unit median Spearman / top-10. Also timed: the factor pass against
one plain training epoch over the train rows (estimated from timed train steps).

Run small to check (e.g. ``--n-test 16 --n-train 128 --length 32 --finetune-steps 5``); the real run is
``--n-test 64 --n-train 512 --length 32`` with a one-epoch fine-tune. Writes JSON to ``--out``.

``--ndr``: the noise-detection part instead. The SMS 20%-noise experiment of ``configs/sms_demo.yaml`` (MiniLM-L6
+ LoRA, 400 train / 160 held-out) run by ``fastinf run`` over 3 seeds with graddot, if, datainf (random 16x16
stores), kfac (kfac16x16 stores) and ekfac (pca16x16 stores; the run fits the factors once per seed) over the
first / middle / last / all groups with mean / rank / vote: NDR@30 and AUC_NDR mean ± std over seeds, written to
``bench/results/curvature_ndr.json`` and ``.md`` (``--ndr-out``). ``--smoke`` shrinks it to a check that it runs
(48 train rows, 1 seed, 1 epoch, no learned check; nothing written under bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.extract import LAYERS, _fidelity, finetune, load  # noqa: E402

GRADDOT = ("16x16", "pca16x16", "pcamix16x16")
KFAC = ("kfac16x16", "kfac64x64")
EKFAC = ("pca16x16", "pca64x64")


def capture(model, tok, texts, labels, units, rows, T, bs):
    """Per unit: padded X [n, L, d_in], G [n, L, d_out] (float32, masked) and the mask [n, L]."""
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import SequenceClassification
    from fastinf.extraction.projection import ProjectionSpec, make_projectors

    one = make_projectors(units, ProjectionSpec(k_out=1, k_in=1))
    parts = {u.name: [] for u in units}
    masks = []
    for s in range(0, len(rows), bs):
        r = rows[s:s + bs]
        enc = tok([texts[i] for i in r], padding="max_length", truncation=True, max_length=T, return_tensors="pt")
        batch = {**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                 "labels": torch.as_tensor(labels[r])}
        res = features_for_batch(model, units, one, batch, SequenceClassification(), raw_units={u.name for u in units})
        masks.append(batch["attention_mask"].float())
        for u in units:
            parts[u.name].append(tuple(t.detach().float() for t in res.raw[u.name]))
    mask = torch.cat(masks)
    return {n: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for n, v in parts.items()}, mask


def unit_features(u, spec_text, factors, X, G, mask, dtype=torch.float32, chunk=64):
    """Features [n, k] of one unit under a projection (UnitProjector, the extraction path)."""
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector

    spec = ProjectionSpec.parse(spec_text, factors=None if spec_text[0].isdigit() else factors.path)
    p = UnitProjector(u, spec, dtype=dtype)
    m = mask if X.dim() == 3 else None
    return torch.cat([p.project(X[i:i + chunk].to(dtype), G[i:i + chunk].to(dtype),
                                None if m is None else m[i:i + chunk]) for i in range(0, len(X), chunk)])


def dense_scores(u, factors, X, G, mask, n_test, chunk=32):
    """Exact GradDot, dense K-FAC and dense EK-FAC [n_test, n_train] (float64) from full eigen-coordinates."""
    uf = factors.unit(u.name)
    full = f"pca{u.d_out}x{u.d_in + int(u.bias)}"
    coords = lambda a, b: unit_features(u, full, factors, X[a:b], G[a:b], mask[a:b], torch.float64, chunk)  # noqa: E731
    Q = coords(0, n_test)
    n = len(X)
    lam_ekfac = torch.zeros(Q.shape[1], dtype=torch.float64)
    for a in range(n_test, n, chunk):
        lam_ekfac += (coords(a, min(n, a + chunk)) ** 2).sum(0)
    lam_ekfac /= n - n_test
    s, av = torch.from_numpy(uf.s_evals), torch.from_numpy(uf.a_evals)
    w_kfac = torch.outer(1 / (s + 0.1 * s.mean()), 1 / (av + 0.1 * av.mean())).reshape(-1)
    w_ekfac = 1 / (lam_ekfac + 0.1 * lam_ekfac.mean())
    out = {k: torch.empty(n_test, n - n_test, dtype=torch.float64) for k in ("graddot", "kfac", "ekfac")}
    for a in range(n_test, n, chunk):
        C = coords(a, min(n, a + chunk))
        sl = slice(a - n_test, a - n_test + len(C))
        out["graddot"][:, sl] = Q @ C.T
        out["kfac"][:, sl] = (Q * w_kfac) @ C.T
        out["ekfac"][:, sl] = (Q * w_ekfac) @ C.T
    return out


def approx_scores(u, factors, X, G, mask, n_test) -> dict:
    """Every approximation's [n_test, n_train] scores for one unit (float64 products of float32 features)."""
    out = {}
    for spec in sorted(set(GRADDOT + KFAC + EKFAC)):
        F = unit_features(u, spec, factors, X, G, mask).double()
        Fq, Fg = F[:n_test], F[n_test:]
        if spec in GRADDOT or spec in KFAC:
            out[spec] = Fq @ Fg.T
        if spec in EKFAC:
            lam = (Fg ** 2).mean(0)
            out[f"ekfac:{spec}"] = (Fq / (lam + 0.1 * lam.mean())) @ Fg.T
    return out


def check_reference(u, X, G, mask, factors, n_test) -> float:
    """Relative error of the eigen-coordinate GradDot against directly formed gradients (one unit)."""
    def grads(a, b):
        Xa = torch.cat([X[a:b], torch.ones(*X[a:b].shape[:-1], 1)], -1) if u.bias else X[a:b]
        return torch.bmm(G[a:b].double().transpose(1, 2), (Xa * mask[a:b, :, None]).double()).reshape(b - a, -1)

    direct = grads(0, n_test) @ grads(n_test, min(len(X), n_test + 32)).T
    ref = dense_scores(u, factors, X[:n_test + 32], G[:n_test + 32], mask[:n_test + 32], n_test)["graddot"]
    return float((ref - direct).abs().max() / direct.abs().max())


def summarise(exact: dict, approx: dict, pairs: list[tuple[str, str, str]]) -> dict:
    """For each (name, reference, approximation): fidelity of the sum over units and per-unit medians."""
    out = {}
    for name, ref, app in pairs:
        total = _fidelity(sum(exact[u][ref] for u in exact).numpy(), sum(approx[u][app] for u in approx).numpy())
        pu = [_fidelity(exact[u][ref].numpy(), approx[u][app].numpy()) for u in exact]
        out[name] = {"sum_over_units": total,
                     "per_unit_median": {k: float(np.median([p[k] for p in pu])) for k in pu[0]},
                     "per_unit_min": {k: float(np.min([p[k] for p in pu])) for k in pu[0]}}
        print(f"{name:28s} flat Spearman {total['spearman_flat']:.3f}  top-10 {total['top10_overlap']:.3f}  "
              f"per-unit median Spearman {out[name]['per_unit_median']['spearman_rowmean']:.3f}  "
              f"top-10 {out[name]['per_unit_median']['top10_overlap']:.3f}", flush=True)
    return out


def train_step_seconds(model, tok, texts, labels, T, bs, reps=3) -> float:
    """Median seconds of a plain forward+backward+AdamW-free step (eval mode) on ``bs`` rows."""
    times = []
    for i in range(reps + 1):
        r = [j % len(texts) for j in range(i * bs, (i + 1) * bs)]
        enc = tok([texts[j] for j in r], padding=True, truncation=True, max_length=T, return_tensors="pt")
        t0 = time.perf_counter()
        out = model(**enc, labels=torch.as_tensor(labels[r]))
        out.loss.backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return float(np.median(times[1:]))


NDR_METHODS = ["graddot", "if", "datainf", "kfac", "ekfac"]
NDR_GROUPS = ["first", "middle", "last", "all"]
NDR_HOWS = ["mean", "rank", "vote"]


def ndr_config(work: Path, smoke: bool) -> object:
    """configs/sms_demo.yaml with the curvature comparison's methods, groups, aggregations and seeds."""
    from fastinf.experiment.config import RunConfig

    cfg = RunConfig.from_yaml(ROOT / "configs" / "sms_demo.yaml")
    data = cfg.to_dict()
    data.update(out=str(work / "run"), seeds=[0] if smoke else [0, 1, 2], name="curvature NDR: SMS 20% noise")
    data["score"] = {**data["score"], "methods": NDR_METHODS}
    data["aggregate"] = {**data["aggregate"], "how": NDR_HOWS, "groups": NDR_GROUPS, "per_block": False}
    data["extract"] = {**data["extract"], "cost_repeats": 0 if smoke else data["extract"]["cost_repeats"]}
    if smoke:
        data["data"] = {**data["data"], "n_train": 48, "n_test": 16}
        data["train"] = {**data["train"], "epochs": 1}
        data["model"] = {**data["model"], "max_length": 16}
        data["evaluate"] = {**data["evaluate"], "require_learned": False}
    return RunConfig.from_dict(data)


def ndr_table(rows: list[dict]) -> list[dict]:
    """NDR@30 / AUC_NDR mean ± std over seeds per (method, how, group), and per baseline."""
    keys = sorted({(r["method"], r["how"], r["group"]) for r in rows},
                  key=lambda k: (k[0] not in NDR_METHODS, NDR_METHODS.index(k[0]) if k[0] in NDR_METHODS else 0,
                                 k[1], NDR_GROUPS.index(k[2]) if k[2] in NDR_GROUPS else 0))
    out = []
    for m, how, g in keys:
        sel = [r for r in rows if (r["method"], r["how"], r["group"]) == (m, how, g)]
        ndr, auc = np.array([r["ndr@30"] for r in sel]), np.array([r["auc_ndr"] for r in sel])
        out.append({"method": m, "how": how, "group": g, "seeds": len(sel), "ndr@30": float(ndr.mean()),
                    "ndr@30_std": float(ndr.std()), "auc_ndr": float(auc.mean()), "auc_ndr_std": float(auc.std())})
    return out


def ndr_markdown(info: dict) -> str:
    lines = [f"# Curvature-aware influence: noise detection on SMS ({info['noise']}, {info['seeds']} seed(s))", "",
             f"{info['n_train']} train / {info['n_test']} held-out, {info['model']}, run {info['seconds']:.0f} s; "
             f"held-out accuracy {info['heldout_acc']}.", "",
             "| method | how | group | NDR@30 | AUC_NDR |", "|---|---|---|---|---|"]
    for r in info["table"]:
        lines.append(f"| {r['method']} | {r['how']} | {r['group']} | {r['ndr@30']:.3f} ± {r['ndr@30_std']:.3f} | "
                     f"{r['auc_ndr']:.3f} ± {r['auc_ndr_std']:.3f} |")
    return "\n".join(lines) + "\n"


def main_ndr(args: argparse.Namespace) -> int:
    """The ``--ndr`` mode (see the module docstring)."""
    from fastinf.experiment.pipeline import run_experiment

    with tempfile.TemporaryDirectory(prefix="fastinf-curv-ndr-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        cfg = ndr_config(work, args.smoke)
        t0 = time.perf_counter()
        res = run_experiment(cfg, echo=print)
        seconds = time.perf_counter() - t0
    rows = res.results["rows"]
    info = {"config": "configs/sms_demo.yaml", "noise": f"{cfg.noise.kind} {cfg.noise.rate:g}",
            "seeds": len(cfg.seeds), "n_train": cfg.data.n_train, "n_test": cfg.data.n_test, "model": cfg.model.name,
            "methods": NDR_METHODS, "groups": NDR_GROUPS, "hows": NDR_HOWS, "seconds": round(seconds, 1),
            "heldout_acc": [round(t["heldout_acc"], 3) for t in res.results["train"]], "smoke": args.smoke,
            "threads": torch.get_num_threads(), "costs": res.results.get("costs", []), "table": ndr_table(rows)}
    out = Path(args.ndr_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    out.with_suffix(".md").write_text(ndr_markdown(info))
    print(ndr_markdown(info))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ndr", action="store_true", help="the NDR comparison (fastinf run on the SMS demo setup)")
    p.add_argument("--smoke", action="store_true", help="--ndr: a tiny check that it runs")
    p.add_argument("--ndr-out", default=str(ROOT / "bench" / "results" / "curvature_ndr.json"))
    p.add_argument("--work", default=None, help="--ndr: keep the run directory here (default: a temp dir)")
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--finetune-steps", type=int, default=150, help="~1 epoch of the SMS rows at batch 32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="/tmp/curvature.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ndr:
        return main_ndr(args)
    from fastinf.data.datasets import TextDataset, load_sms
    from fastinf.extraction.factors import fit_factors
    from fastinf.extraction.units import discover, select

    sms = load_sms()
    texts, labels = list(sms.texts), np.asarray(sms.labels)
    order = np.random.default_rng(0).permutation(len(texts))
    test_rows, train_rows = order[:args.n_test], order[args.n_test:args.n_test + args.n_train]
    model, tok = load()
    ft_rows = order[args.n_test:]   # fine-tune on everything but the test rows
    ft = finetune(model, tok, [texts[i] for i in ft_rows], labels[ft_rows], args.finetune_steps, T=args.length)
    units = select(discover(model), LAYERS)
    step_s = train_step_seconds(model, tok, [texts[i] for i in train_rows], labels[train_rows], args.length,
                                args.batch_size)
    with tempfile.TemporaryDirectory(prefix="fastinf-curv-") as tmp:
        train_ds = TextDataset(texts=[texts[i] for i in train_rows], labels=labels[train_rows], name="sms-train")
        t0 = time.perf_counter()
        factors = fit_factors(model, tok, train_ds, Path(tmp) / "factors", layers=LAYERS, max_length=args.length,
                              batch_size=args.batch_size, progress=False)
        factor_s = time.perf_counter() - t0
        epoch_s = step_s * len(train_rows) / args.batch_size
        print(f"factor pass {factor_s:.1f}s over {len(train_rows)} rows; one train epoch ~{epoch_s:.1f}s "
              f"(ratio {factor_s / epoch_s:.2f})", flush=True)
        raw, mask = capture(model, tok, texts, labels, units, np.concatenate([test_rows, train_rows]), args.length,
                            args.batch_size)
        ref_err = check_reference(units[0], *raw[units[0].name], mask, factors, args.n_test)
        print(f"reference check on {units[0].name}: eigen-coordinate GradDot vs direct, rel. error {ref_err:.2e}")
        exact, approx = {}, {}
        t1 = time.perf_counter()
        for u in units:
            X, G = raw[u.name]
            exact[u.name] = dense_scores(u, factors, X, G, mask, args.n_test)
            approx[u.name] = approx_scores(u, factors, X, G, mask, args.n_test)
        score_s = time.perf_counter() - t1
    pairs = [(f"graddot {s}", "graddot", s) for s in GRADDOT]
    pairs += [(f"kfac {s[4:]} vs dense K-FAC", "kfac", s) for s in KFAC]
    pairs += [(f"ekfac {s[3:]} vs dense EK-FAC", "ekfac", f"ekfac:{s}") for s in EKFAC]
    pairs += [("graddot 16x16 vs dense EK-FAC", "ekfac", "16x16")]
    results = summarise(exact, approx, pairs)
    info = {"n_test": args.n_test, "n_train": args.n_train, "max_length": args.length, "units": len(units),
            "finetune": ft, "factor_pass_s": round(factor_s, 2), "train_epoch_est_s": round(epoch_s, 2),
            "factor_pass_over_epoch": round(factor_s / epoch_s, 3), "reference_rel_error": ref_err,
            "scoring_s": round(score_s, 1), "threads": torch.get_num_threads(), "results": results}
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
