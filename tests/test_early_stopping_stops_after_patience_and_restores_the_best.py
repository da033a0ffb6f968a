"""Early stopping (``train.patience``): training ends at the first epoch that completes ``patience`` epochs
without a lower held-out loss; every checkpoint up to there is bit-identical to the full run's, the scored
checkpoint is the held-out-loss minimum among them, and the evaluation split is measured on those restored
best weights (equal to evaluating the saved best checkpoint)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastinf.experiment.config import ModelConfig, TrainConfig
from fastinf.experiment.train import _EarlyStop, evaluate_model, finetune, load_checkpoint
from test_train import make_sentiment, make_tiny_model_dir

EPOCHS = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def recipe(patience: int | None) -> TrainConfig:
    """A constant, too-high lr on 30%-noisy labels: the held-out loss goes down, then up and down."""
    return TrainConfig(epochs=EPOCHS, batch_size=16, lr=3e-2, warmup_ratio=0.0, schedule="constant", lora=None,
                       patience=patience)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    mc = ModelConfig(name=make_tiny_model_dir(root / "bert"), max_length=16)
    clean = make_sentiment(96)
    flip = np.random.default_rng(0).random(96) < 0.3
    train = clean.with_labels(np.where(flip, 1 - clean.labels, clean.labels))
    sel, ev = make_sentiment(48, 1), make_sentiment(40, 2)
    full = finetune(mc, recipe(None), train, sel, root / "full", seed=0)
    stopped = {p: finetune(mc, recipe(p), train, sel, root / f"p{p}", seed=0, evaluation=ev) for p in (1, 2)}
    return full, stopped, ev


def literal_stop(losses: list[float], patience: int) -> int:
    """The epoch (1-based) early stopping ends at: the first with ``patience`` non-improving epochs in a row."""
    best, since = float("inf"), 0
    for e, loss in enumerate(losses, start=1):
        if loss < best:
            best, since = loss, 0
        else:
            since += 1
        if since >= patience:
            return e
    return len(losses)


@pytest.mark.parametrize("patience", [1, 2])
def test_stops_after_patience_with_the_full_runs_checkpoints_and_the_best_selected(runs, patience) -> None:
    full, stopped, _ = runs
    res = stopped[patience]
    losses = [h["heldout_loss"] for h in full.history]
    stop = literal_stop(losses, patience)
    assert stop < EPOCHS, f"the recipe must trigger early stopping: held-out losses {losses}"
    assert [c.epoch for c in res.checkpoints] == list(range(stop + 1)) and res.stopped_epoch == stop
    for c in res.checkpoints:
        a, b = load_file(str(Path(c.path) / "trainable.safetensors")), load_file(
            str(Path(full.checkpoints[c.epoch].path) / "trainable.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = min(range(1, stop + 1), key=lambda e: (losses[e - 1], e))
    assert res.best_epoch == best and full.stopped_epoch is None


@pytest.mark.parametrize("patience", [1, 2])
def test_evaluation_split_is_measured_on_the_restored_best_weights(runs, patience) -> None:
    _, stopped, ev = runs
    res = stopped[patience]
    model, tok = load_checkpoint(res.best.path)
    loss, acc, pred = evaluate_model(model, tok, ev, max_length=16, return_predictions=True)
    assert res.evaluation["epoch"] == res.best_epoch
    assert res.evaluation["predictions"] == pred and res.evaluation["acc"] == acc
    assert res.evaluation["loss"] == pytest.approx(loss, rel=1e-6)
    assert res.evaluation["labels"] == [int(v) for v in ev.labels]


def test_early_stop_rule_equals_the_literal_loop_on_random_losses() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        losses = list(rng.integers(0, 4, int(rng.integers(1, 12))).astype(float))
        patience = int(rng.integers(1, 4))
        rule, ended = _EarlyStop(patience), len(losses)
        for e, loss in enumerate(losses, start=1):
            if rule.update(loss):
                ended = e
                break
        assert ended == literal_stop(losses, patience)
    assert not _EarlyStop(None).update(1.0)
