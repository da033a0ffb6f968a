"""NDR, AUC_NDR, ROC-AUC and average precision: hand-computed examples, literal references, the
perfect and random scorers, tie handling, bootstrap intervals, cancellation ratios and bad input."""
import json

import numpy as np
import pytest

import fastinf
from fastinf.errors import ConfigError, DataError, NonFiniteError
from fastinf.aggregation.evaluate import (auc_ndr, average_precision, bootstrap_ci, cancellation_ratio, cancellation_ratios,
                              format_table, layer_table, load_noise_mask, ndr, ndr_curve, roc_auc)

# sorted ascending: -1.0 (noisy), 0.1, 0.3, 0.5 (noisy), 2.0
S = np.array([0.1, 0.5, -1.0, 0.3, 2.0])
M = np.array([False, True, True, False, False])


def test_hand_computed_example():
    np.testing.assert_allclose(ndr_curve(S, M), [0, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert ndr(S, M, 20) == 0.5 and ndr(S, M, 30) == 0.5  # k = round(1.5) = 2 (half up)
    assert ndr(S, M, 80) == 1.0
    assert ndr(S, M, [40, 80]) == {40.0: 0.5, 80.0: 1.0}
    assert auc_ndr(S, M) == pytest.approx(3.5 / (2 / 2 + 3))
    assert roc_auc(S, M) == pytest.approx(4 / 6)  # noisy -1.0 beats 3 clean, 0.5 beats 1
    assert average_precision(S, M) == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert fastinf.ndr(S, M, at=30) == 0.5 and fastinf.auc_ndr(S, M) == pytest.approx(0.875)


def test_ties_are_counted_in_expectation():
    s, m = np.array([0.0, 0.0, 0.0, 1.0]), np.array([True, False, False, False])
    np.testing.assert_allclose(ndr_curve(s, m), [0, 1 / 3, 2 / 3, 1, 1])
    # the order of tied samples must not matter
    np.testing.assert_allclose(ndr_curve(s[[2, 1, 0, 3]], m[[2, 1, 0, 3]]), ndr_curve(s, m))
    assert auc_ndr(s, m) == pytest.approx(3 / 3.5)
    assert roc_auc(s, m) == pytest.approx(2 / 3)
    assert average_precision(s, m) == pytest.approx(1 / 3)


def test_roc_auc_and_ap_match_literal_definitions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, 40).astype(float)
        m = rng.random(40) < 0.3
        m[0] = True
        m[1] = False
        pairs = [(1.0 if a < b else 0.5 if a == b else 0.0) for a in s[m] for b in s[~m]]
        assert roc_auc(s, m) == pytest.approx(sum(pairs) / len(pairs))
        s2 = rng.standard_normal(40)  # no ties: AP = mean precision at the noisy positions
        order = np.argsort(s2)
        hits = np.cumsum(m[order])
        want = np.mean([hits[j] / (j + 1) for j in range(40) if m[order][j]])
        assert average_precision(s2, m) == pytest.approx(want)


def test_perfect_scorer_detects_all_noise_once_p_reaches_the_noise_rate():
    rng = np.random.default_rng(1)
    n = 1000
    m = np.zeros(n, bool)
    m[rng.choice(n, 200, replace=False)] = True
    s = np.where(m, -1.0, 1.0) + 0.01 * rng.standard_normal(n)
    for p in (20, 25, 30, 50, 100):
        assert ndr(s, m, p) == 1.0
    assert ndr(s, m, 10) == pytest.approx(0.5)
    assert auc_ndr(s, m) == pytest.approx((201 / 2 + 800) / (100 + 800))
    assert roc_auc(s, m) == 1.0 and average_precision(s, m) == 1.0


def test_random_scorer_over_many_seeds():
    n, ndrs, aucs = 2000, [], []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        m = np.zeros(n, bool)
        m[rng.choice(n, n // 5, replace=False)] = True
        s = rng.standard_normal(n)
        ndrs.append(ndr(s, m, 30))
        aucs.append(auc_ndr(s, m))
    assert np.mean(ndrs) == pytest.approx(0.30, abs=0.01)
    assert np.mean(aucs) == pytest.approx((n + 1) / 2 / (0.9 * n), abs=0.005)  # ~ 0.556


def test_bad_inputs():
    with pytest.raises(ConfigError, match="expected 5 flags"):
        ndr(S, M[:4])
    with pytest.raises(DataError, match="no sample is marked noisy"):
        auc_ndr(S, np.zeros(5, bool))
    with pytest.raises(ConfigError, match="0/1"):
        ndr(S, np.array([0, 1, 2, 0, 0]))
    with pytest.raises(NonFiniteError, match="NaN"):
        ndr(np.array([0.1, np.nan, 0.2, 0, 1]), M)
    for p in (0, -5, 101):
        with pytest.raises(ConfigError, match=r"\(0, 100\]"):
            ndr(S, M, p)
    with pytest.raises(ConfigError, match="1-D"):
        ndr(np.zeros((2, 5)), M)
    with pytest.raises(DataError, match="clean"):
        roc_auc(S, np.ones(5, bool))


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    m = rng.random(500) < 0.2
    s = rng.standard_normal(500) - 0.8 * m
    a = bootstrap_ci(s, m, "auc_ndr", n_boot=200, seed=3)
    b = bootstrap_ci(s, m, "auc_ndr", n_boot=200, seed=3)
    assert a == b
    assert a.low < a.value < a.high and a.high - a.low < 0.2
    c = bootstrap_ci(s, m, lambda x, y: ndr(x, y, 50), n_boot=50)
    assert c.low <= c.high
    with pytest.raises(ConfigError, match="metric"):
        bootstrap_ci(s, m, "f1")


def _literal_cancellation(g):
    l1 = np.abs(g).sum() / np.abs(g.sum(axis=0)).sum()
    l2 = sum(np.linalg.norm(r) for r in g) / np.linalg.norm(g.sum(axis=0))
    return l1, l2


def test_cancellation_ratio_math():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((50, 6))
    c = cancellation_ratio(g)
    assert (c.l1, c.l2) == pytest.approx(_literal_cancellation(g))
    streamed = cancellation_ratio(g[i:i + 7] for i in range(0, 50, 7))
    assert (streamed.l1, streamed.l2, streamed.n) == pytest.approx((c.l1, c.l2, 50))
    same = cancellation_ratio(np.tile(g[:1], (9, 1)))  # identical gradients never cancel
    assert (same.l1, same.l2) == pytest.approx((1.0, 1.0))
    h = np.round(4 * g[:3])  # integers: the sum cancels exactly
    assert cancellation_ratio(np.concatenate([h, -h])).l2 == np.inf


def test_cancellation_ratios_from_a_store(tmp_path):
    from fastinf.store import GradientStore

    rng = np.random.default_rng(5)
    feats = {"a": rng.standard_normal((37, 8)).astype(np.float32),
             "b": (rng.standard_normal((37, 4)) + 2).astype(np.float32)}
    store = GradientStore.from_arrays(tmp_path / "s", feats, dtype="float32")
    res = cancellation_ratios(store, block_size=10)
    assert set(res) == {"a", "b"}
    for k, g in feats.items():
        assert (res[k].l1, res[k].l2) == pytest.approx(_literal_cancellation(g.astype(np.float64)))
    assert res["b"].l1 < res["a"].l1  # shifted gradients agree more, so cancel less
    with pytest.raises(ConfigError, match="not in the store"):
        cancellation_ratios(store, ["zz"])


def test_layer_table_finds_the_informative_unit():
    rng = np.random.default_rng(6)
    n = 200
    m = np.zeros(n, bool)
    m[:40] = True
    arr = rng.standard_normal((3, 8, n)).astype(np.float32)
    arr[1] -= 3.0 * m  # unit 1 gives noisy samples low scores
    rows = layer_table(arr, m, hows=("mean", "rank", "vote"))
    assert len(rows) == (3 + 1) * 3
    best = {(r["group"], r["how"]): r for r in rows}
    for how in ("mean", "rank", "vote"):
        assert best[("unit1", how)]["ndr@30"] == 1.0
        assert best[("unit0", how)]["ndr@30"] < 0.7
    text = format_table(rows)
    assert "unit1" in text and "auc_ndr" in text.splitlines()[0]


def test_load_noise_mask_formats(tmp_path):
    m = np.array([1, 0, 0, 1, 0], bool)
    np.save(tmp_path / "m.npy", m)
    (tmp_path / "m.txt").write_text("1 0\n0 1 0\n")
    (tmp_path / "m.json").write_text(json.dumps([1, 0, 0, 1, 0]))
    (tmp_path / "i.json").write_text(json.dumps({"noisy_indices": [0, 3], "n": 5}))
    np.savez(tmp_path / "n.npz", labels=np.zeros(5), mask=m)
    for name in ("m.npy", "m.txt", "m.json", "i.json", "n.npz"):
        np.testing.assert_array_equal(load_noise_mask(tmp_path / name, 5), m, err_msg=name)
    with pytest.raises(ConfigError, match="expected 6 flags"):
        load_noise_mask(tmp_path / "m.npy", 6)
    with pytest.raises(ConfigError, match="no such file"):
        load_noise_mask(tmp_path / "missing.npy")
