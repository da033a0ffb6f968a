"""With ``data.heldout`` set, `fastinf run` picks the checkpoint on the selection split, measures the
evaluation split once on the best weights, and scores the influence split: three disjoint row sets."""
from __future__ import annotations

import numpy as np

from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from fastinf.experiment.splits import load_named_splits
from fastinf.experiment.train import TrainResult, evaluate_model, load_checkpoint
from fastinf.store import GradientStore
from test_pipeline import tiny_config


def test_run_uses_select_for_checkpoints_and_evaluation_for_learning(tmp_path):
    data = tiny_config(tmp_path)
    data["data"]["heldout"] = "separate"
    data["score"]["methods"] = ["graddot"]
    data["aggregate"] = {"how": ["mean"], "groups": ["last"]}
    data["evaluate"] = {"require_learned": False}
    cfg = RunConfig.from_dict(data)
    run_experiment(cfg)
    splits = load_named_splits(cfg)
    ids = {k: set(np.asarray(getattr(splits, k).ids).tolist()) for k in ("select", "influence", "evaluation")}
    assert not (ids["select"] & ids["influence"]) and not (ids["select"] & ids["evaluation"])
    assert not (ids["influence"] & ids["evaluation"])
    sdir = next(p for p in (tmp_path / "run").iterdir() if (p / "train" / "train.json").is_file())
    tr = TrainResult.load(sdir / "train")
    model, tok = load_checkpoint(tr.best.path)
    _, acc_sel = evaluate_model(model, tok, splits.select, max_length=16)
    _, acc_ev = evaluate_model(model, tok, splits.evaluation, max_length=16)
    assert abs(tr.best.heldout_acc - acc_sel) < 1e-9           # the checkpoint was judged on the selection split
    assert tr.evaluation is not None and len(tr.evaluation["predictions"]) == len(splits.evaluation)
    assert abs(tr.evaluation["acc"] - acc_ev) < 1e-9 and tr.evaluation["epoch"] == tr.best.epoch
    test_store = GradientStore.open(sdir / "stores" / "test")
    assert set(np.asarray(test_store.meta.ids).tolist()) == ids["influence"]
