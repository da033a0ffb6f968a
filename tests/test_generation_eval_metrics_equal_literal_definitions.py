"""Generation-task evaluation: ROC-AUC and recall@k equal their literal definitions on fresh random scores
(ties included); the templated dataset is deterministic by seed with 10 balanced classes; ``generation_eval``
runs end to end on a tiny causal LM (prompt tokens carry no loss); planted separable scores give AUC 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.experiment.generation import (
    encode_prompt_target, generation_eval, per_test_metrics, recall_at_k, row_auc,
)
from fastinf.experiment.templated_task import CLASS_NAMES, make_templated_task, templated_splits, tiny_causal_lm


def literal_auc(s: np.ndarray, pos: np.ndarray) -> float:
    """P[score of a positive > score of a negative] + 0.5 P[equal], over all pairs."""
    num, den = 0.0, 0
    for i in np.flatnonzero(pos):
        for j in np.flatnonzero(~pos):
            num += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
            den += 1
    return num / den


def literal_recall(s: np.ndarray, pos: np.ndarray, k: int) -> float:
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return sum(bool(pos[i]) for i in order[:k]) / min(k, int(pos.sum()))


def test_auc_and_recall_equal_their_literal_definitions() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(4, 40))
        s = rng.integers(0, 5, n).astype(float) if rng.random() < 0.5 else rng.standard_normal(n)
        pos = rng.random(n) < 0.4
        pos[0], pos[-1] = True, False
        assert row_auc(s, pos) == pytest.approx(literal_auc(s, pos), abs=1e-12)
        for k in (1, 3, n):
            assert recall_at_k(s, pos, k) == pytest.approx(literal_recall(s, pos, k), abs=1e-12)


def test_planted_separable_scores_give_auc_and_recall_one() -> None:
    rng = np.random.default_rng(1)
    ytr, yte = np.repeat(np.arange(10), 5), np.repeat(np.arange(10), 2)
    scores = rng.standard_normal((20, 50)) + 10.0 * (yte[:, None] == ytr[None, :])
    auc, rec = per_test_metrics(scores, ytr, yte, k=5)
    assert np.all(auc == 1.0) and np.all(rec == 1.0)
    auc, _ = per_test_metrics(-scores, ytr, yte, k=5)
    assert np.all(auc == 0.0)


def test_templated_task_is_seeded_balanced_and_ten_class() -> None:
    a, b, c = make_templated_task(4, seed=3), make_templated_task(4, seed=3), make_templated_task(4, seed=4)
    assert a.prompts == b.prompts and a.targets == b.targets and np.array_equal(a.labels, b.labels)
    assert a.prompts != c.prompts
    assert len(CLASS_NAMES) == 10 and np.array_equal(np.bincount(a.labels), np.full(10, 4))
    tr, te = templated_splits(3, 2, seed=3)
    assert np.array_equal(np.bincount(tr.labels), np.full(10, 3)) and np.array_equal(np.bincount(te.labels),
                                                                                     np.full(10, 2))
    assert a.targets[0] == " ".join(a.prompts[0].split(" : ")[1].rstrip(" =>").split()[::-1])  # class 0 = reverse


@pytest.fixture(scope="module")
def tiny():
    tr, te = templated_splits(3, 1, seed=0)
    model, tok = tiny_causal_lm(tr.vocabulary() + te.vocabulary(), seed=0, hidden=16)
    return tr, te, model, tok


def test_prompt_tokens_carry_no_loss(tiny) -> None:
    tr, _, _, tok = tiny
    enc = encode_prompt_target(tok, tr.prompts[:4], tr.targets[:4], max_length=64)
    for i in range(4):
        n_prompt = len(tok(tr.prompts[i], add_special_tokens=False)["input_ids"])
        n_all = int(enc["attention_mask"][i].sum())
        assert torch.all(enc["labels"][i, :n_prompt] == -100) and torch.all(enc["labels"][i, n_all:] == -100)
        assert torch.equal(enc["labels"][i, n_prompt:n_all], enc["input_ids"][i, n_prompt:n_all])


def test_generation_eval_runs_end_to_end_on_a_tiny_causal_lm(tiny) -> None:
    tr, te, model, tok = tiny
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tab = generation_eval(model, tok, tr, te, layers="first,last", proj="2x2", k=3)
    finally:
        torch.set_num_threads(n)
    methods = {r["method"] for r in tab.rows}
    assert methods == {"graddot", "gradcos", "if", "datainf", "repsim_last", "repsim_mean"}
    units = {r["unit"] for r in tab.rows if r["method"] == "graddot"}
    assert "all" in units and len(units) == len(tab.setup["units"]) + 1
    assert {r["unit"] for r in tab.rows if r["method"] == "repsim_mean"} == {"block[0]", "block[1]"}
    for r in tab.rows:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and r["n_test"] == 10
        assert r["auc_lo"] <= r["auc"] <= r["auc_hi"]
    assert tab.to_markdown().count("\n") == len(tab.rows) + 2
