"""A grid setting whose removal leaves one class cannot fine-tune a classifier: the setting is recorded with
the accuracy of the constant predictor that training set yields (and ``single_class``), not a crash that
stops every other setting (found on SMS: removing the lowest 30% by first-layer mean removed every spam)."""
from __future__ import annotations

import json

import numpy as np

from fastinf.data import TextDataset
from fastinf.experiment.retrain_jobs import GridJob, _retrain, read_result


def test_single_class_removal_writes_the_constant_predictor_row(tmp_path):
    train = TextDataset(texts=[f"t{i}" for i in range(10)], labels=np.array([0] * 7 + [1] * 3))
    evaluation = TextDataset(texts=[f"e{i}" for i in range(8)], labels=np.array([0, 0, 0, 0, 0, 1, 1, 1]))
    job = GridJob(key="k", row={"method": "graddot", "how": "mean", "group": "first", "p": 30.0},
                  drop=np.array([7, 8, 9]), model_cfg=None, train_cfg=None, train=train, select=evaluation,
                  evaluation=evaluation, n_classes=2, seed=0, recipe="r1", work=str(tmp_path / "work"),
                  dest=str(tmp_path / "k.json"))
    key, _ = _retrain(job)          # model_cfg None: any attempt to fine-tune would fail
    row = read_result(tmp_path / "k.json", "r1")
    assert key == "k" and row is not None
    assert row["single_class"] == 0 and row["accuracy"] == 5 / 8
    assert np.isnan(row["loss"]) and row["method"] == "graddot"
    assert json.loads((tmp_path / "k.json").read_text())["p"] == 30.0
