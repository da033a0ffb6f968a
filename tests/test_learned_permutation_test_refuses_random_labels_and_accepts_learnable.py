"""Learned-or-refuse with the label-permutation test on the evaluation split: a tiny BERT fine-tuned on random
labels is refused (binomial and permutation p large), one fine-tuned on a learnable task is accepted
(both p small); the permutation p-value equals its literal definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.experiment.config import ModelConfig, RunConfig, TrainConfig
from fastinf.experiment.learned import NotLearnedError, permutation_p, require_learned_result
from fastinf.experiment.train import finetune
from test_train import make_sentiment, make_tiny_model_dir

RECIPE = TrainConfig(epochs=3, batch_size=16, lr=1e-2, lora=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    mc = ModelConfig(name=make_tiny_model_dir(root / "bert"), max_length=16)
    rng = np.random.default_rng(5)
    train, sel, ev = make_sentiment(160), make_sentiment(48, 1), make_sentiment(60, 2)
    shuffled = lambda d: d.with_labels(rng.integers(0, 2, len(d)))  # noqa: E731  (labels unrelated to the text)
    learn = finetune(mc, RECIPE, train, sel, root / "learn", seed=0, evaluation=ev)
    rand = finetune(mc, RECIPE, shuffled(train), shuffled(sel), root / "random", seed=0, evaluation=shuffled(ev))
    return learn, rand, sel


def test_random_labels_are_refused_and_a_learnable_task_accepted(trained) -> None:
    learn, rand, sel = trained
    cfg, said = RunConfig(), []
    ok = require_learned_result(cfg, 0, learn, sel.labels, said.append)
    assert ok["verdict"] == "learned" and ok["p_permutation"] < 0.01 and ok["p_binomial"] < 0.01
    assert ok["n"] == 60 and "learned the task" in said[-1]
    with pytest.raises(NotLearnedError, match="permutation p="):
        require_learned_result(cfg, 0, rand, sel.labels, said.append)
    cfg.evaluate.require_learned = False
    v = require_learned_result(cfg, 0, rand, sel.labels, said.append)
    assert v["verdict"] == "not_learned" and v["p_permutation"] > 0.05 and "going on" in said[-1]


def test_without_an_evaluation_split_the_selection_accuracy_is_checked(trained) -> None:
    learn, _, sel = trained
    learn.evaluation = None
    v = require_learned_result(RunConfig(), 0, learn, sel.labels, lambda s: None)
    assert v["p_permutation"] is None and v["accuracy"] == learn.best.heldout_acc


def test_permutation_p_equals_its_literal_definition() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = int(rng.integers(20, 80))
        lab = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < rng.uniform(0, 1), lab, rng.integers(0, 3, n))
        acc = np.mean(pred == lab)
        gen, hits = np.random.default_rng(7), 0
        for _ in range(300):
            perm = gen.permutation(lab)
            hits += int(np.mean(pred == perm) >= acc - 1e-12)
        assert permutation_p(pred, lab, n_perm=300, seed=7) == (1 + hits) / 301
