"""TracIn over the checkpoints a training-time capture wrote is the literal sum
``Σ_c lr_c ⟨g_test,c, g_train,c⟩`` (per unit, in float64, lr_c read from the capture), through the API
(``fastinf.score(None, None, "tracin", checkpoints=DIR)``) and the CLI (``fastinf score --method tracin
--capture DIR``); a capture without the test split, or --capture with other stores, is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastinf
from fastinf.cli.app import main
from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError
from fastinf.extraction.callback import CheckpointCapture
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore
from tests._models import NUM_LABELS, make_model
from tests._tokenizer import random_texts, tiny_tokenizer

KW = dict(layers="all", proj="4x4", dtype="fp32", batch_size=4, max_length=16)


def _data(seed: int, n: int) -> TextDataset:
    return TextDataset(texts=random_texts(n, seed), labels=np.arange(n) % NUM_LABELS, name=f"d{seed}")


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """Three checkpoints of a plain SGD loop with a decaying lr (fresh random data and weights)."""
    tmp = tmp_path_factory.mktemp("tracin")
    tok = tiny_tokenizer(tmp / "v")
    torch.manual_seed(3)
    model = make_model("bert", seed=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cap = CheckpointCapture(tmp / "cap", tok, train=_data(11, 9), test=_data(12, 5), every=1, **KW)
    texts = random_texts(12, 13)
    for step in range(1, 4):
        enc = tok(texts[4 * (step - 1):4 * step], padding=True, return_tensors="pt")
        model(**enc, labels=torch.arange(4) % NUM_LABELS).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        cap.step(model, opt, step)
    return tmp, cap


def _literal(cap: CheckpointCapture, root) -> dict[str, np.ndarray]:
    """Per unit: Σ_c lr_c Q_c G_cᵀ, a float64 loop over the checkpoints."""
    out: dict[str, np.ndarray] = {}
    for ck in cap.checkpoints:
        test = GradientStore.open(root / ck["stores"]["test"])
        train = GradientStore.open(root / ck["stores"]["train"])
        for u in train.unit_names:
            q, g = np.asarray(test.features(u), np.float64), np.asarray(train.features(u), np.float64)
            out[u] = out.get(u, 0.0) + ck["lr"] * (q @ g.T)
    return out


def test_tracin_over_a_capture_directory_is_the_literal_lr_weighted_sum(capture):
    tmp, cap = capture
    assert [c["lr"] for c in cap.checkpoints] == pytest.approx([0.25, 0.125, 0.0625])
    s = fastinf.score(None, None, "tracin", checkpoints=tmp / "cap", precision="float64")
    ref = _literal(cap, tmp / "cap")
    assert sorted(s.unit_names) == sorted(ref)
    for u, want in ref.items():
        np.testing.assert_allclose(np.asarray(s.unit_scores(u), np.float64), want, rtol=1e-6,
                                   atol=1e-6 * np.abs(want).max())
    listed = fastinf.score(None, None, "tracin", precision="float64",
                           checkpoints=[(tmp / "cap" / c["stores"]["test"], tmp / "cap" / c["stores"]["train"],
                                         c["lr"]) for c in cap.checkpoints])
    for u in ref:
        assert np.array_equal(np.asarray(listed.unit_scores(u)), np.asarray(s.unit_scores(u)))


def test_cli_score_capture_equals_the_api(capture, capsys):
    tmp, _ = capture
    out = tmp / "cli-scores"
    assert main(["score", "--method", "tracin", "--capture", str(tmp / "cap"), "--out", str(out),
                 "--no-progress", "--json"]) == 0
    api = fastinf.score(None, None, "tracin", checkpoints=str(tmp / "cap"))
    cli = ScoreSet.open(out)
    for u in api.unit_names:
        assert np.array_equal(np.asarray(cli.unit_scores(u)), np.asarray(api.unit_scores(u)))
    assert main(["score", "--method", "graddot", "--capture", str(tmp / "cap"), "--out", str(tmp / "x")]) == 2
    assert "--capture" in capsys.readouterr().err
    assert not (tmp / "x").exists()


def test_a_capture_without_the_test_split_is_refused(tmp_path):
    tok = tiny_tokenizer(tmp_path / "v")
    model = make_model("bert")
    cap = CheckpointCapture(tmp_path / "cap", tok, train=_data(1, 4), steps=[1], **KW)
    cap.step(model, 0.1, 1)
    with pytest.raises(ConfigError, match="no 'test' store"):
        fastinf.score(None, None, "tracin", checkpoints=tmp_path / "cap")
