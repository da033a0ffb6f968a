"""The label-prior baseline (minority class first, ties random) and class-balanced NDR: a scorer that only
knows the label beats chance on plain NDR of an imbalanced noisy task, and sits at chance on balanced NDR.
Each function equals a literal implementation of its definition on fresh random inputs."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.aggregation.balanced import auc_ndr_per_class, balanced_metrics, balanced_ndr, ndr_per_class
from fastinf.data.noise import inject_noise
from fastinf.experiment.metrics import baseline_scores, evaluate_scores, label_prior_scores


def _ref_ndr(scores: np.ndarray, mask: np.ndarray, p: float) -> float:
    """Noisy fraction among the k lowest; the tie group straddling k counts in expectation."""
    k = int(np.floor(p * scores.size / 100 + 0.5))
    if k == 0:
        return 0.0
    kth = np.sort(scores)[k - 1]
    below, tied = scores < kth, scores == kth
    return (mask[below].sum() + (k - below.sum()) * mask[tied].sum() / tied.sum()) / mask.sum()


def _ref_auc(scores: np.ndarray, mask: np.ndarray) -> float:
    n = scores.size
    total = sum(_ref_ndr(scores, mask, 100.0 * k / n) for k in range(1, n + 1))
    return total / (mask.sum() / 2 + (n - mask.sum()))


def test_label_prior_puts_the_minority_class_first_and_breaks_ties_randomly() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=200, p=[0.6, 0.3, 0.1])
    s = label_prior_scores(labels, seed=0)
    counts = np.bincount(labels)
    order = np.argsort(s)
    ranked_counts = counts[labels[order]]
    assert np.all(np.diff(ranked_counts) >= 0), "classes must come in ascending frequency"
    assert np.array_equal(s, label_prior_scores(labels, seed=0)), "seeded"
    assert not np.array_equal(np.argsort(s), np.argsort(label_prior_scores(labels, seed=1)))
    within = order[labels[order] == 0]
    assert not np.all(np.diff(within) > 0), "inside a class the order is random, not the index order"
    even = np.array([0, 1] * 50)      # equal counts: the two classes interleave
    first_half = labels_of_lowest(even, label_prior_scores(even, seed=0), 50)
    assert 0 < first_half.sum() < 50


def labels_of_lowest(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    return labels[np.argsort(scores)[:k]]


def test_label_prior_baseline_reads_the_store_labels(tmp_path) -> None:
    from fastinf.store import GradientStore

    labels = np.array([0, 0, 0, 1, 0, 1, 0, 0], dtype=np.int64)
    store = GradientStore.from_arrays(tmp_path / "s", {"u": np.zeros((8, 2), np.float32)},
                                      meta={"label": labels})
    s = baseline_scores("label_prior", store, seed=5)
    assert set(np.argsort(s)[:2]) == {3, 5}
    assert np.array_equal(s, label_prior_scores(labels, 5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_and_balanced_ndr_equal_the_literal_definition(seed) -> None:
    rng = np.random.default_rng(seed)
    n = 150
    labels = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    mask = rng.random(n) < 0.25
    scores = np.round(rng.normal(size=n), 1)       # rounded: ties exercise the in-expectation rule
    for p in (10.0, 30.0, 55.0):
        per = ndr_per_class(scores, mask, labels, p)
        for c in range(3):
            sel = labels == c
            assert per[c] == pytest.approx(_ref_ndr(scores[sel], mask[sel], p), abs=1e-12)
        assert balanced_ndr(scores, mask, labels, p) == pytest.approx(np.mean(list(per.values())), abs=1e-12)
    auc = auc_ndr_per_class(scores, mask, labels)
    for c in range(3):
        sel = labels == c
        assert auc[c] == pytest.approx(_ref_auc(scores[sel], mask[sel]), abs=1e-9)
    keys = balanced_metrics(scores, mask, labels, [30.0])
    assert {"bal_ndr@30", "bal_auc_ndr", "ndr@30[c=0]", "auc_ndr[c=2]"} <= set(keys)


def test_a_class_without_noise_is_left_out_of_the_balanced_mean() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    mask = np.zeros(20, bool)
    mask[[1, 4]] = True
    scores = np.arange(20, dtype=float)
    per = ndr_per_class(scores, mask, labels, 30)
    assert np.isnan(per[1]) and balanced_ndr(scores, mask, labels, 30) == per[0]


def test_label_prior_beats_chance_on_plain_ndr_but_not_on_balanced_ndr() -> None:
    rng = np.random.default_rng(0)
    clean = (rng.random(2000) < 0.25).astype(np.int64)          # 75 / 25 imbalance
    noise = inject_noise(clean, 0.2, seed=0)
    prior = label_prior_scores(noise.labels, seed=0)
    plain = evaluate_scores(prior, noise.mask, [30.0], labels=noise.labels)
    assert plain["ndr@30"] > 0.45, "ranking the minority label first finds noise on an imbalanced task"
    # constant within a class (all tied): balanced NDR is exactly the chance level of each class
    counts = np.bincount(noise.labels).astype(float)[noise.labels]
    exact = balanced_ndr(counts, noise.mask, noise.labels, 30)
    n_c = np.bincount(noise.labels)
    assert exact == pytest.approx(np.mean(np.floor(0.3 * n_c + 0.5) / n_c), abs=1e-12)
    assert abs(plain["bal_ndr@30"] - 0.30) < 0.06
