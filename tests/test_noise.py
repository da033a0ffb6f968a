"""Label-noise injection: exact rates, determinism, class-conditional targets, and bad input."""
import numpy as np
import pytest

from fastinf.errors import ConfigError, DataError
from fastinf.data.noise import inject_noise, load_noise


def _labels(n=1000, c=2, seed=0):
    return np.random.default_rng(seed).integers(0, c, size=n)


@pytest.mark.parametrize("c", [2, 3, 7])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2, 0.5])
def test_uniform_rate_is_exact_and_every_flip_changes_the_label(c, rate):
    y = _labels(999, c)
    r = inject_noise(y, rate, seed=3)
    assert r.n_noisy == int(round(rate * y.size))
    assert np.array_equal(r.mask, r.labels != y), "mask must mark exactly the changed labels"
    assert np.array_equal(r.clean_labels, y)
    assert r.labels.min() >= 0 and r.labels.max() < c


def test_binary_uniform_noise_flips():
    y = _labels(500, 2)
    r = inject_noise(y, 0.3, seed=1)
    assert np.array_equal(r.labels[r.mask], 1 - y[r.mask])


def test_uniform_targets_cover_all_other_classes_evenly():
    y = np.zeros(30000, dtype=int)
    y[::2] = 1
    y[::3] = 2
    r = inject_noise(y, 0.5, seed=0)
    for c in range(3):
        moved = r.labels[r.mask & (y == c)]
        counts = np.bincount(moved, minlength=3)
        assert counts[c] == 0
        others = counts[[k for k in range(3) if k != c]]
        assert abs(others[0] - others[1]) < 0.1 * others.sum(), f"class {c}: targets not uniform {counts}"


def test_noise_is_deterministic_in_the_seed():
    y = _labels(300, 3)
    a, b, c = inject_noise(y, 0.2, seed=5), inject_noise(y, 0.2, seed=5), inject_noise(y, 0.2, seed=6)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_class_conditional_default_is_cyclic_with_exact_per_class_counts():
    y = _labels(1200, 4, seed=2)
    r = inject_noise(y, 0.25, seed=0, kind="class_conditional")
    for c in range(4):
        members = y == c
        assert r.mask[members].sum() == int(round(0.25 * members.sum()))
        assert np.all(r.labels[r.mask & members] == (c + 1) % 4)


def test_class_conditional_with_rates_and_transition():
    y = _labels(2000, 3, seed=4)
    t = [[0, 1, 0], [0.5, 0, 0.5], [1, 0, 0]]
    r = inject_noise(y, 0.0, seed=0, kind="class_conditional", class_rates=[0.0, 0.4, 0.1], transition=t)
    assert r.mask[y == 0].sum() == 0
    assert r.mask[y == 1].sum() == int(round(0.4 * (y == 1).sum()))
    assert set(np.unique(r.labels[r.mask & (y == 1)])) == {0, 2}
    assert np.all(r.labels[r.mask & (y == 2)] == 0)


def test_save_and_load_roundtrip(tmp_path):
    r = inject_noise(_labels(100, 2), 0.2, seed=9)
    r.save(tmp_path / "noise.npz")
    back = load_noise(tmp_path / "noise.npz")
    assert np.array_equal(back.mask, r.mask) and np.array_equal(back.labels, r.labels)
    assert (back.kind, back.rate, back.seed, back.n_classes) == ("uniform", 0.2, 9, 2)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        inject_noise(_labels(10, 2), rate)


def test_single_class_dataset_is_refused():
    with pytest.raises(DataError, match="at least two classes"):
        inject_noise(np.ones(50, dtype=int), 0.2)


def test_bad_transition_and_kind_are_refused():
    y = _labels(50, 2)
    with pytest.raises(ConfigError, match="zero diagonal"):
        inject_noise(y, 0.2, kind="class_conditional", transition=[[0.5, 0.5], [1, 0]])
    with pytest.raises(ConfigError, match="sum to 1"):
        inject_noise(y, 0.2, kind="class_conditional", transition=[[0, 0.5], [1, 0]])
    with pytest.raises(ConfigError, match="valid kinds"):
        inject_noise(y, 0.2, kind="pairflip")


def test_data_module_reexports_inject_noise():
    from fastinf import data

    assert data.inject_noise is inject_noise
