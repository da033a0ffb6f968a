"""`fastinf run` accepts tracin (over the fine-tune's epoch checkpoints), tracin_we and selfinf in
score.methods and scores them: tracin's score set is the literal float64 sum over epochs of lr_e Q_e G_eᵀ
(lr_e from lr_log.json, the stores of every epoch), selfinf's row is fastinf.score(selfinf) on the run's
train store, tracin_we scores only groups made of the embedding unit, and each has metric rows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.errors import ConfigError
from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from fastinf.scoring.estimators import score
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore
from test_pipeline import tiny_config

METHODS = ["tracin", "tracin_we", "selfinf"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt-methods")
    data = tiny_config(root)
    data["train"]["epochs"] = 2
    data["score"] = {"methods": METHODS, "fused": True, "baselines": ["loss"]}
    data["aggregate"] = {"how": ["mean", "rank"], "groups": ["first", "all"], "per_block": False}
    data["extract"]["cost_repeats"] = 0
    data["evaluate"] = {"require_learned": False}
    try:
        yield root, run_experiment(RunConfig.from_dict(data))
    finally:
        torch.set_num_threads(n)


def test_run_config_accepts_the_checkpoint_methods_and_refuses_unknown_ones():
    for m in METHODS:
        RunConfig.from_dict({"score": {"methods": [m]}})
    with pytest.raises(ConfigError, match="tracin_we"):
        RunConfig.from_dict({"score": {"methods": ["tracinn"]}})


def test_run_scores_each_checkpoint_method(run):
    root, res = run
    rows = json.loads((root / "run" / "seed-0" / "metrics.json").read_text())
    got = {(r["method"], r["group"]) for r in rows if r["method"] in METHODS}
    assert got == {("tracin", "first"), ("tracin", "all"), ("selfinf", "first"), ("selfinf", "all"),
                   ("tracin_we", "first")}
    assert all(np.isfinite(r["auc_ndr"]) for r in rows if r["method"] in METHODS)


def test_tracin_is_the_literal_lr_weighted_sum_over_the_epoch_checkpoints(run):
    root, _ = run
    sdir = root / "run" / "seed-0"
    lr_log = json.loads((sdir / "train" / "lr_log.json").read_text())
    best = json.loads((sdir / "train" / "train.json").read_text())["best_epoch"]
    assert [e["epoch"] for e in lr_log] == [1, 2]
    s = ScoreSet.open(sdir / "scores" / "tracin")
    want: dict[str, np.ndarray] = {}
    for e in lr_log:
        base = sdir / "stores" if e["epoch"] == best else sdir / "stores" / "tracin" / f"ckpt-{e['epoch']}"
        test, train = GradientStore.open(base / "test"), GradientStore.open(base / "train")
        for u in train.unit_names:
            q, g = np.asarray(test.features(u), np.float64), np.asarray(train.features(u), np.float64)
            want[u] = want.get(u, 0.0) + e["lr"] * (q @ g.T)
    assert sorted(want) == sorted(s.unit_names)
    for u, w in want.items():
        np.testing.assert_allclose(np.asarray(s.unit_scores(u), np.float64), w, rtol=1e-4,
                                   atol=1e-5 * np.abs(w).max())


def test_selfinf_equals_fastinf_score_on_the_train_store(run):
    root, _ = run
    sdir = root / "run" / "seed-0"
    ref = score(None, GradientStore.open(sdir / "stores" / "train"), "selfinf")
    got = ScoreSet.open(sdir / "scores" / "selfinf")
    for u in ref.unit_names:
        assert np.array_equal(np.asarray(got.unit_scores(u)), np.asarray(ref.unit_scores(u)))
    we = ScoreSet.open(sdir / "scores" / "tracin_we")
    assert [u.kind for u in we.units] == ["embedding"]


def test_the_two_stage_path_gives_the_same_metric_rows(run, tmp_path):
    """score.fused: false scores the checkpoint methods in the score stage: the same rows as the fused run."""
    root, _ = run
    cfg = RunConfig.from_yaml(root / "run" / "config.yaml")
    cfg.score.fused = False
    run_experiment(cfg.validate(), tmp_path / "two-stage")
    pick = lambda p: sorted((r["method"], r["how"], r["group"], r["auc_ndr"])          # noqa: E731
                            for r in json.loads(p.read_text()) if r["method"] in METHODS)
    assert pick(tmp_path / "two-stage" / "seed-0" / "metrics.json") == pick(root / "run" / "seed-0" / "metrics.json")
