"""Datamodel retrains: subsets are exact-size and deterministic by seed (a larger m keeps the first ones),
margins are z_y - logsumexp(z_others), a retrain set SIGKILLed part-way resumes to exactly the ground truth
of an uninterrupted one, and foreign / other-recipe directories are refused before any work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.errors import ConfigError, DataError
from fastinf.experiment.config import LoraSettings, ModelConfig, TrainConfig
from fastinf.experiment.datamodels import GroundTruth, datamodels, draw_subsets
from fastinf.experiment.margins import classification_margins
from test_train import make_sentiment, make_tiny_model_dir

TESTS = Path(__file__).resolve().parent


def test_subsets_are_seeded_exact_size_and_prefix_stable():
    a = draw_subsets(50, 8, 0.5, seed=3)
    assert a.dtype == bool and a.shape == (8, 50) and (a.sum(1) == 25).all()
    np.testing.assert_array_equal(a, draw_subsets(50, 8, 0.5, seed=3))
    np.testing.assert_array_equal(draw_subsets(50, 12, 0.5, seed=3)[:8], a)
    assert not np.array_equal(a, draw_subsets(50, 8, 0.5, seed=4))
    assert (draw_subsets(10, 3, 0.3, seed=0).sum(1) == 3).all()
    with pytest.raises(ConfigError, match="lds.m"):
        draw_subsets(50, 2)
    with pytest.raises(ConfigError, match="lds.alpha"):
        draw_subsets(50, 4, alpha=1.0)


def test_margin_is_correct_logit_minus_logsumexp_of_the_others():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    got = classification_margins(z, y)
    for b in range(6):
        others = [float(z[b, c]) for c in range(4) if c != int(y[b])]
        assert float(got[b]) == pytest.approx(float(z[b, y[b]]) - np.log(np.sum(np.exp(others))), abs=1e-12)
    two = torch.randn(3, 2, dtype=torch.float64)
    np.testing.assert_allclose(classification_margins(two, torch.tensor([1, 0, 1])),
                               [two[0, 1] - two[0, 0], two[1, 0] - two[1, 1], two[2, 1] - two[2, 0]])


_CHILD = """
import sys; sys.path.insert(0, {tests!r})
import torch; torch.set_num_threads(1)
from fastinf.experiment.config import LoraSettings, ModelConfig, TrainConfig
from fastinf.experiment.datamodels import datamodels
from test_train import make_sentiment
tc = TrainConfig(epochs=1, batch_size=8, lr=1e-2, lora=LoraSettings(r=2, alpha=4, target_modules=["query", "value"]))
datamodels(ModelConfig(name={model!r}, max_length=16), tc, make_sentiment(24, 0), make_sentiment(6, 1), {out!r},
           m={m}, seed=1, threads=1)
"""


def _recipe(model: str):
    return ModelConfig(name=model, max_length=16), TrainConfig(
        epochs=1, batch_size=8, lr=1e-2, lora=LoraSettings(r=2, alpha=4, target_modules=["query", "value"]))


def test_killed_retrain_set_resumes_to_the_same_ground_truth(tmp_path):
    model = make_tiny_model_dir(tmp_path / "bert")
    mc, tc = _recipe(model)
    train, test = make_sentiment(24, 0), make_sentiment(6, 1)
    m = 8
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), model=model, out=str(killed),
                                                                   m=m)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "margins" / "1.npy").exists() and child.poll() is None:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    left = len(list((killed / "margins").glob("*.npy")))
    assert 2 <= left < m, "the kill must land part-way through the retrain set"
    with pytest.raises(DataError, match="have not been retrained yet"):
        GroundTruth.open(killed)
    resumed = datamodels(mc, tc, train, test, killed, m=m, seed=1, threads=1)
    ref = datamodels(mc, tc, train, test, tmp_path / "ref", m=m, seed=1, threads=1)
    np.testing.assert_array_equal(resumed.subsets, ref.subsets)
    np.testing.assert_array_equal(resumed.margins, ref.margins)
    assert resumed.margins.shape == (m, 6) and np.isfinite(resumed.margins).all()
    assert not (killed / "work").exists()
    again = GroundTruth.open(killed)
    np.testing.assert_array_equal(again.margins, ref.margins)


def test_foreign_and_other_recipe_directories_are_refused_before_work(tmp_path):
    model = make_tiny_model_dir(tmp_path / "bert")
    mc, tc = _recipe(model)
    train, test = make_sentiment(16, 0), make_sentiment(4, 1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep")
    with pytest.raises(ConfigError, match="not a fastinf datamodels"):
        datamodels(mc, tc, train, test, foreign, m=3, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "keep"
    out = tmp_path / "dm"
    datamodels(mc, tc, train, test, out, m=3, threads=1)
    with pytest.raises(ConfigError, match="another recipe"):
        datamodels(mc, TrainConfig(**{**tc.__dict__, "lr": 2e-2}), train, test, out, m=3)
    grown = datamodels(mc, tc, train, test, out, m=4, threads=1)        # resumes: 3 kept, 1 new
    assert grown.m == 4 and len(list((out / "margins").glob("*.npy"))) == 4
    with pytest.raises(ConfigError, match="lds.workers"):
        datamodels(mc, tc, train, test, out, m=4, workers=0)
