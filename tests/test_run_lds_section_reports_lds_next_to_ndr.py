"""`fastinf run` with an `lds:` section (and `fastinf lds CONFIG`) on a tiny LoRA BERT: the datamodel retrains
are stored and reused, every (method, aggregation, group) and baseline gets an LDS equal to a literal
recomputation (scipy Spearman of the subset sums of the per-test aggregation), the report shows LDS next to
NDR (table + plots), the recommendation can optimise LDS, and bad lds settings fail before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from fastinf.aggregation.per_test import aggregate_per_test
from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.experiment.config import RunConfig
from fastinf.experiment.datamodels import GroundTruth
from fastinf.experiment.lds_run import lds
from fastinf.extraction.units import select
from fastinf.scoring.scores import ScoreSet
from test_pipeline import tiny_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(root):
    data = tiny_config(root)
    data["score"] = {"methods": ["graddot", "gradcos"]}
    data["aggregate"] = {"how": ["mean", "rank", "vote"], "groups": ["first", "q2", "last", "all"]}
    data["extract"]["cost_repeats"] = 1
    data["lds"] = {"m": 5, "alpha": 0.5, "seed": 3}
    data["evaluate"] = {"recommend_by": "lds"}
    return data


@pytest.fixture(scope="module")
def lds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldsrun")
    data = _config(root)
    (root / "config.yaml").write_text(yaml.safe_dump(data))
    return root, RunConfig.from_dict(data), lds(root / "config.yaml")


def test_lds_rows_equal_a_literal_recomputation(lds_run):
    root, cfg, res = lds_run
    sdir = root / "run" / "seed-0"
    truth = GroundTruth.open(sdir / "datamodels")
    assert truth.m == 5 and truth.margins.shape == (5, 16) and (truth.subsets.sum(1) == 32).all()
    rows = {(r["method"], r["how"], r["group"]): r for r in res["rows"]}
    assert {("loss", "-", "-"), ("random", "-", "-")} <= set(rows)
    scores = ScoreSet.open(sdir / "scores" / "gradcos")
    units = [u.name for u in select(scores.units, "last")]
    per = aggregate_per_test(scores, "rank", groups={"last": units}, dtype="float64")
    tau = per.get("last", "rank")
    want = [spearmanr([tau[t, truth.subsets[j]].sum() for j in range(5)], truth.margins[:, t]).statistic
            for t in range(16)]
    want = [w for w in want if np.isfinite(w)]
    got = rows[("gradcos", "rank", "last")]
    assert got["lds"] == pytest.approx(np.mean(want), abs=1e-9) and got["lds_n"] == len(want)
    assert got["lds_low"] <= got["lds"] <= got["lds_high"]


def test_report_shows_lds_next_to_ndr_and_recommends_by_lds(lds_run):
    root, cfg, res = lds_run
    out = root / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"][-1] == "lds" and results["recommend_by"] == "lds"
    assert all("lds" in r for r in results["rows"])
    assert results["recommendation"] is None or results["recommendation"]["metric"] == "lds"
    md = (out / "report.md").read_text()
    assert "### LDS next to ndr@30" in md and "LDS 95% CI" in md
    for name in ["lds_vs_ndr.png", "layers_graddot_lds.png", "layers_gradcos_lds.png"]:
        assert (out / name).stat().st_size > 1000, name


def test_rerun_reuses_the_retrains_and_a_larger_m_adds_subsets(lds_run):
    root, cfg, res = lds_run
    margins = root / "run" / "seed-0" / "datamodels" / "margins"
    stamp = {p.name: p.stat().st_mtime_ns for p in margins.glob("*.npy")}
    again = lds(root / "config.yaml", m=6)
    assert len(list(margins.glob("*.npy"))) == 6
    assert all(margins.joinpath(n).stat().st_mtime_ns == t for n, t in stamp.items())
    assert {(r["method"], r["how"], r["group"]) for r in again["rows"]} == \
        {(r["method"], r["how"], r["group"]) for r in res["rows"]}


def test_bad_lds_settings_fail_before_any_work(tmp_path, capsys):
    data = _config(tmp_path)
    data["out"] = str(tmp_path / "fresh")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["lds", str(tmp_path / "c.yaml"), "--m", "2"]) == 2
    assert "lds.m must be an integer >= 3" in capsys.readouterr().err
    assert main(["lds", str(tmp_path / "c.yaml"), "--alpha", "1.5"]) == 2
    assert not (tmp_path / "fresh").exists()
    bad = dict(data, lds=None)
    with pytest.raises(ConfigError, match="recommend_by: lds needs an lds: section"):
        RunConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="unknown config key 'lds.subsets'"):
        RunConfig.from_dict(dict(data, lds={"subsets": 4}))
