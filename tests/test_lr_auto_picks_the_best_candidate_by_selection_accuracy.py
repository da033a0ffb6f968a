"""``train.lr: auto``: the chosen lr is the best candidate of the sweep by checkpoint-selection accuracy (each
recorded candidate equals a plain short fine-tune at that lr), the sweep is deterministic, recorded in the
train directory and resumed, and bad settings are clean ConfigErrors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinf.errors import ConfigError
from fastinf.experiment.config import ModelConfig, TrainConfig
from fastinf.experiment.lr_auto import SWEEP_FILE, pick_best
from fastinf.experiment.train import finetune
from test_train import make_sentiment, make_tiny_model_dir

SWEEP = [1e-6, 1e-2, 3e-2]          # 1e-6 cannot move the tiny BERT, 3e-2 overshoots in 2 epochs, 1e-2 learns
AUTO = TrainConfig(epochs=1, batch_size=16, lr="auto", lr_sweep=SWEEP, lr_sweep_epochs=2, lora=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr_auto")
    mc = ModelConfig(name=make_tiny_model_dir(root / "bert"), max_length=16)
    train, sel = make_sentiment(160), make_sentiment(48, 1)
    result = finetune(mc, AUTO, train, sel, root / "auto", seed=0)
    return root, mc, train, sel, result


def test_lr_auto_picks_the_most_accurate_candidate_equal_to_plain_short_runs(setup) -> None:
    root, mc, train, sel, result = setup
    rec = json.loads((Path(result.out) / SWEEP_FILE).read_text())
    assert [r["lr"] for r in rec["results"]] == SWEEP
    for i, lr in enumerate(SWEEP):           # literal reference: a plain fine-tune of the short budget at lr
        ref = finetune(mc, TrainConfig(epochs=2, batch_size=16, lr=lr, lora=None, select="last"), train, sel,
                       root / f"ref{i}", seed=0)
        assert rec["results"][i]["heldout_acc"] == ref.checkpoints[-1].heldout_acc
        assert rec["results"][i]["heldout_loss"] == ref.checkpoints[-1].heldout_loss
    accs = [r["heldout_acc"] for r in rec["results"]]
    assert accs[1] > max(accs[0], accs[2]) + 0.2, f"the planted best lr is not clearly better: {accs}"
    assert rec["chosen"] == result.lr == 1e-2
    assert result.checkpoints[-1].lr > 0 and json.loads((Path(result.out) / "train.json").read_text())["lr"] == 1e-2


def test_lr_auto_is_deterministic_and_resumes_the_missing_candidates(setup, monkeypatch) -> None:
    root, mc, train, sel, result = setup
    again = finetune(mc, AUTO, train, sel, root / "again", seed=0)
    a = json.loads((Path(result.out) / SWEEP_FILE).read_text())
    b = json.loads((Path(again.out) / SWEEP_FILE).read_text())
    strip = lambda rec: [{k: v for k, v in r.items() if k != "seconds"} for r in rec["results"]]  # noqa: E731
    assert strip(a) == strip(b) and a["key"] == b["key"] and again.lr == result.lr
    path = Path(again.out) / SWEEP_FILE                    # an interrupted sweep: only the first candidate done
    path.write_text(json.dumps({"key": b["key"], "results": b["results"][:1], "chosen": None}))
    import fastinf.experiment.train as train_mod

    calls = []
    real = train_mod._sweep_one
    monkeypatch.setattr(train_mod, "_sweep_one", lambda m, c, *a, **k: calls.append(c.lr) or real(m, c, *a, **k))
    resumed = finetune(mc, AUTO, train, sel, root / "again", seed=0)
    assert calls == SWEEP[1:], "only the candidates not yet recorded are trained"
    assert strip(json.loads(path.read_text())) == strip(b) and resumed.lr == result.lr


def test_pick_best_equals_its_literal_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 6))
        res = [{"lr": float(10.0 ** -rng.integers(1, 6)), "heldout_acc": float(rng.integers(0, 3) / 2),
                "heldout_loss": float(rng.integers(0, 3))} for _ in range(n)]
        best = None
        for i, r in enumerate(res):           # highest acc, then lowest loss, then earliest
            if best is None or (r["heldout_acc"], -r["heldout_loss"]) > (res[best]["heldout_acc"],
                                                                         -res[best]["heldout_loss"]):
                best = i
        assert pick_best(res) == res[best]["lr"]


def test_lr_auto_settings_are_validated(tmp_path) -> None:
    assert TrainConfig(lr="5e-4").lr == 5e-4
    for bad in (dict(lr="fast"), dict(lr=0.0), dict(lr_sweep=[]), dict(lr_sweep=[1e-3, -1.0]),
                dict(lr_sweep_epochs=0), dict(patience=0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="checkpoint-selection split"):
        finetune(ModelConfig(name=make_tiny_model_dir(tmp_path / "bert"), max_length=16), AUTO,
                 make_sentiment(32), None, tmp_path / "out", seed=0)
