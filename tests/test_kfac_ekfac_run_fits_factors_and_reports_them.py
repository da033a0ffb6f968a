"""Invariant: a ``fastinf run`` with a pca projection and methods graddot, kfac, ekfac fits the factors itself
(once per seed, cached), extracts the kfac stores kfac needs next to the pca stores, and its metric rows,
report and cost table list every method; its kfac / ekfac rows equal ``fastinf.score`` on the run's own
stores aggregated the same way; a rerun recomputes nothing."""
from __future__ import annotations

import pytest

from fastinf.aggregation.aggregate import aggregate_all
from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from fastinf.experiment.metrics import evaluate_scores
from fastinf.scoring.estimators import score
from fastinf.store import GradientStore
from test_pipeline import tiny_config

METHODS = ["graddot", "kfac", "ekfac"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfac-run")
    data = tiny_config(root)
    data["extract"] = {**data["extract"], "proj": "pca4x4", "factor_samples": 48}
    data["score"] = {"methods": METHODS}                  # fused (the default)
    data["aggregate"] = {"how": ["mean", "rank", "vote"], "groups": ["first", "q2", "last", "all"],
                         "per_block": False}
    return root, data, run_experiment(RunConfig.from_dict(data))


def test_run_lists_kfac_and_ekfac_in_rows_report_and_costs(run):
    root, data, res = run
    sdir = root / "run" / "seed-0"
    assert (sdir / "stores" / "factors" / "factors.json").is_file()
    assert GradientStore.open(sdir / "stores" / "train").identity["projection"]["kind"] == "pca"
    assert GradientStore.open(sdir / "stores" / "kfac4x4" / "train").identity["projection"]["kind"] == "kfac"
    methods = {r["method"] for r in res.results["rows"]}
    assert set(METHODS) <= methods
    report = (root / "run" / "report.md").read_text()
    for m in METHODS:
        assert m in report
    costs = res.results["costs"]
    assert costs and all(c.get(f"score_s.{m}") is not None for c in costs for m in METHODS)
    assert all(c.get("factor_s") is not None and c["factor_s"] >= 0 for c in costs)


def test_run_rows_equal_reference_scores_of_its_stores(run):
    root, data, res = run
    sdir = root / "run" / "seed-0"
    from fastinf.data.noise import load_noise

    mask = load_noise(sdir / "noise.npz").mask
    pairs = {"kfac": sdir / "stores" / "kfac4x4", "ekfac": sdir / "stores"}
    rows = {(r["method"], r["how"], r["group"]): r for r in res.results["rows"]}
    for method, base in pairs.items():
        test, train = GradientStore.open(base / "test"), GradientStore.open(base / "train")
        agg = aggregate_all(score(test, train, method), how=["rank", "vote"], groups={"all": "all", "q2": "q2"})
        for g in ("all", "q2"):
            for how in ("rank", "vote"):
                want = evaluate_scores(agg.get(g, how), mask, [30.0], train.meta.label)
                assert rows[(method, how, g)]["ndr@30"] == want["ndr@30"], (method, how, g)


def test_rerun_is_cached_and_factors_are_not_refitted(run):
    root, data, _ = run
    again = run_experiment(RunConfig.from_dict(data))
    assert again.stages_run == []
    assert "seed-0/factors" in again.stages_cached


def test_run_config_refuses_bad_curvature_requests(tmp_path):
    from fastinf.errors import ConfigError

    data = tiny_config(tmp_path)
    for extract, methods, match in (({"proj": "pca4x4@/tmp/f"}, ["graddot"], "fits its own factors"),
                                    ({"proj": "exact"}, ["kfac"], "need a Kronecker projection"),
                                    ({"proj": "pcb4x4"}, ["graddot"], "extract.proj must be"),
                                    ({"proj": "4x4", "factor_samples": 0}, ["ekfac"], "factor_samples")):
        bad = {**data, "extract": {**data["extract"], **extract}, "score": {"methods": methods}}
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_dict(bad)
    RunConfig.from_dict({**data, "score": {"methods": ["kfac", "ekfac"]}})
