"""Report building from a results table: summaries equal a direct mean/std, the recommendation is the
best lift per unit of cost, and every output file is written with the numbers it was given."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.experiment.report import compact_table, recommend, summarize, write_report

METRICS = ["ndr@30", "auc_ndr", "roc_auc"]


def _results(seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    rows = []
    quality = {"first": 0.40, "q2": 0.55, "last": 0.35, "all": 0.56}
    for seed in seeds:
        for method in ("graddot", "datainf"):
            for how, bonus in (("mean", 0.0), ("rank", 0.03), ("vote", 0.05)):
                for g, q in quality.items():
                    v = q + bonus + rng.normal(0, 0.01)
                    rows.append({"seed": seed, "method": method, "how": how, "group": g, "kind": "group",
                                 "block": None, "role": None, "n_units": 3, "ndr@30": v, "auc_ndr": v + 0.1,
                                 "roc_auc": v + 0.2})
                for b in (-1, 0, 1, 2):
                    for role in ("attn.q", "attn.v", "block"):
                        v = 0.4 + 0.05 * b + rng.normal(0, 0.01)
                        rows.append({"seed": seed, "method": method, "how": how, "group": f"{role}{b}",
                                     "kind": "block" if role == "block" else "unit", "block": b, "role": role,
                                     "n_units": 1, "ndr@30": v, "auc_ndr": v, "roc_auc": v})
        rows.append({"seed": seed, "method": "random", "how": "-", "group": "-", "kind": "baseline", "block": None,
                     "role": None, "n_units": 0, "ndr@30": 0.3, "auc_ndr": 0.56, "roc_auc": 0.5})
    costs = [{"group": "first", "n_units": 1, "bytes_per_sample": 512, "extract_s_per_1k": 9.0, "extract_share": 0.9,
              "score_s": 0.1},
             {"group": "q2", "n_units": 3, "bytes_per_sample": 1536, "extract_s_per_1k": 5.0, "extract_share": 0.5,
              "score_s": 0.3},
             {"group": "last", "n_units": 1, "bytes_per_sample": 512, "extract_s_per_1k": 1.0, "extract_share": 0.05,
              "score_s": 0.1},
             {"group": "all", "n_units": 9, "bytes_per_sample": 4608, "extract_s_per_1k": 10.0, "extract_share": 1.0,
              "score_s": 0.9}]
    return {"metrics": METRICS, "rows": rows, "costs": costs, "config_hash": "abc123",
            "setup": {"model": "tiny", "chance": {"ndr@30": 0.3, "auc_ndr": 0.56, "roc_auc": 0.5}},
            "train": [{"seed": s, "best_epoch": 1, "heldout_loss": 0.5, "heldout_acc": 0.8, "seconds": 1.0}
                      for s in seeds],
            "filter_retrain": [{"seed": 0, "strategy": k, "n_removed": 3, "accuracy": a}
                               for k, a in (("none", 0.7), ("influence", 0.8), ("random", 0.7), ("oracle", 0.9))]}


def test_summary_is_mean_and_sample_std_over_seeds():
    res = _results()
    summary = summarize(res["rows"], METRICS)
    for s in summary:
        vals = [r["ndr@30"] for r in res["rows"]
                if (r["method"], r["how"], r["group"], r["kind"]) == (s["method"], s["how"], s["group"], s["kind"])]
        assert s["n_seeds"] == 3 == len(vals)
        assert s["ndr@30_mean"] == pytest.approx(np.mean(vals), abs=1e-15)
        assert s["ndr@30_std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-15)
    one = summarize([r for r in res["rows"] if r["seed"] == 0], METRICS)
    assert all(s["ndr@30_std"] == 0.0 for s in one)


def test_recommendation_is_best_lift_per_cost_among_good_groups():
    res = _results()
    summary = summarize(res["rows"], METRICS)
    rec = recommend(summary, res["costs"], "ndr@30", chance=0.3, tolerance=0.9)
    # last is cheapest but far below the best quality; q2 is within 10% of all at half the cost
    assert rec["recommended"]["group"] == "q2"
    assert rec["best_quality"]["group"] == "all"
    for c in rec["candidates"]:
        assert c["efficiency"] == pytest.approx((c["quality"] - 0.3) / c["cost_share"])
    assert recommend(summary, res["costs"], "ndr@30", chance=0.99) is None


def test_write_report_outputs_and_numbers(tmp_path):
    res = _results()
    files = write_report(res, tmp_path)
    for p in (files.markdown, files.html, files.results_json, files.results_parquet):
        assert p.is_file()
    assert {p.name for p in files.plots} == {"layers_graddot.png", "layers_datainf.png", "cost_quality.png"}
    md = files.markdown.read_text()
    assert "Recommended layers: `q2`" in md
    back = json.loads(files.results_json.read_text())
    s = next(x for x in back["summary"] if (x["method"], x["how"], x["group"]) == ("datainf", "vote", "q2"))
    assert f"{s['ndr@30_mean']:.3f} ± {s['ndr@30_std']:.3f}" in md
    assert "| influence | 3 | 0.800 |" in md and "| oracle | 3 | 0.900 |" in md
    html = files.html.read_text()
    assert html.count("<img") == 3 and "data:image/png;base64," in html
    import pyarrow.parquet as pq

    t = pq.read_table(files.results_parquet)
    assert t.num_rows == len(res["rows"])
    assert np.allclose(t.column("ndr@30").to_numpy(), [r["ndr@30"] for r in res["rows"]])
    table = compact_table(back)
    assert "recommended layers: q2" in table and "random" in table


def test_write_report_refuses_a_table_without_rows(tmp_path):
    from fastinf.errors import ConfigError

    with pytest.raises(ConfigError, match="'rows'"):
        write_report({"metrics": METRICS}, tmp_path)
