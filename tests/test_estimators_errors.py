"""Bad input to scoring is refused with a clear, typed error — and leaves no partial output behind."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.errors import ConfigError, NonFiniteError, SelectorError, StoreError, StoreMismatchError
from fastinf.scoring.estimators import score
from fastinf.store import GradientStore


def _store(path, units: dict[str, int], n: int, seed: int = 0, **kw) -> GradientStore:
    rng = np.random.default_rng(seed)
    feats = {u: rng.standard_normal((n, k)).astype(np.float32) for u, k in units.items()}
    return GradientStore.from_arrays(path, feats, dtype="float32", meta={"ids": 100 + np.arange(n)}, **kw)


def test_stores_from_different_models_are_refused(tmp_path):
    test = _store(tmp_path / "te", {"a": 4}, 3, model_name="model-A")
    train = _store(tmp_path / "tr", {"a": 4}, 10, model_name="model-B")
    with pytest.raises(StoreMismatchError, match="different models"):
        score(test, train, "graddot", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stores_with_different_projections_are_refused(tmp_path):
    from fastinf.extraction.projection import ProjectionSpec

    test = _store(tmp_path / "te", {"a": 16}, 3, projection=ProjectionSpec("kron", 4, 4, seed=0))
    train = _store(tmp_path / "tr", {"a": 16}, 10, projection=ProjectionSpec("kron", 4, 4, seed=1))
    with pytest.raises(StoreMismatchError, match="projections"):
        score(test, train, "graddot")


def test_test_units_missing_from_train_are_named(tmp_path):
    test = _store(tmp_path / "te", {"a": 4, "b": 4, "c": 4}, 3)
    train = _store(tmp_path / "tr", {"a": 4, "b": 4}, 10)
    with pytest.raises(StoreMismatchError, match=r"lacks: c\b"):
        score(test, train, "graddot")
    s = score(test, train, "graddot", layers="a,b")                  # restricting to shared units works
    assert s.unit_names == ["a", "b"]
    with pytest.raises(SelectorError):
        score(test, train, "graddot", layers="blocks[7:9]")


def test_mismatched_feature_dims_are_refused(tmp_path):
    test = _store(tmp_path / "te", {"a": 4}, 3)
    train = _store(tmp_path / "tr", {"a": 5}, 10)
    with pytest.raises(StoreMismatchError, match="feature dim"):
        score(test, train, "graddot")


@pytest.mark.parametrize("kw, match", [
    ({"method": "if", "damping": 0.0}, "damping"),
    ({"method": "if", "damping": -1.0}, "damping"),
    ({"method": "datainf", "damping": "rel:-0.1"}, "damping"),
    ({"method": "if", "rank": 6}, "smaller than the feature dimension"),
    ({"method": "if", "rank": 9}, "smaller than the feature dimension"),
    ({"method": "graddot", "rank": 2}, "rank= applies"),
    ({"method": "gradcos", "damping": 1e-3}, "uses no curvature"),
    ({"method": "if", "curvature": "lissa"}, "curvature= applies"),
    ({"method": "magic"}, "unknown method"),
    ({"method": "graddot", "topk_tokens": 3}, "topk_tokens"),
    ({"method": "graddot", "precision": "float16"}, "precision"),
    ({"method": "tracin_we"}, "tokens"),
    ({"method": "repsim"}, "reps"),
])
def test_bad_arguments(tmp_path, kw, match):
    test = _store(tmp_path / "te", {"a": 6}, 3)
    train = _store(tmp_path / "tr", {"a": 6}, 10)
    with pytest.raises((ConfigError, StoreError), match=match):
        score(test, train, out=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists(), "a refused run must not leave output behind"


def test_nonfinite_features_are_reported_by_id_or_dropped(tmp_path):
    rng = np.random.default_rng(0)
    G = rng.standard_normal((12, 4)).astype(np.float32)
    Q = rng.standard_normal((5, 4)).astype(np.float32)
    G[[2, 9], 1] = np.nan
    G[4, 0] = np.inf
    Q[3, 2] = np.nan
    train = GradientStore.from_arrays(tmp_path / "tr", {"a": G}, dtype="float32", meta={"ids": 100 + np.arange(12)})
    test = GradientStore.from_arrays(tmp_path / "te", {"a": Q}, dtype="float32", meta={"ids": 50 + np.arange(5)})
    with pytest.raises(NonFiniteError, match=r"ids 53\b"):
        score(test, train, "graddot", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    clean_test = GradientStore.from_arrays(tmp_path / "te2", {"a": np.nan_to_num(Q)}, dtype="float32")
    with pytest.raises(NonFiniteError, match="102, 104, 109"):
        score(clean_test, train, "if")
    for method in ("graddot", "if", "datainf"):
        s = score(test, train, method, drop_nonfinite=True, precision="float64")
        keep_g, keep_q = np.delete(np.arange(12), [2, 4, 9]), np.delete(np.arange(5), [3])
        np.testing.assert_array_equal(s.train_ids, 100 + keep_g)
        np.testing.assert_array_equal(s.test_ids, 50 + keep_q)
        assert s.params["dropped_train_ids"] == [102, 104, 109] and s.params["dropped_test_ids"] == [53]
        g, q = G[keep_g].astype(np.float64), Q[keep_q].astype(np.float64)
        if method == "graddot":
            want = q @ g.T
        else:
            ref = score(GradientStore.from_arrays(tmp_path / f"q{method}", {"a": q}, dtype="float32"),
                        GradientStore.from_arrays(tmp_path / f"g{method}", {"a": g}, dtype="float32"),
                        method, precision="float64")
            want = ref.unit_scores("a")
        np.testing.assert_allclose(s.unit_scores("a"), want, rtol=1e-5, atol=1e-6)


def test_output_directory_is_not_clobbered(tmp_path):
    test = _store(tmp_path / "te", {"a": 4}, 3)
    train = _store(tmp_path / "tr", {"a": 4}, 10)
    score(test, train, "graddot", out=tmp_path / "out")
    with pytest.raises(ConfigError, match="overwrite"):
        score(test, train, "graddot", out=tmp_path / "out")
    s = score(test, train, "gradcos", out=tmp_path / "out", overwrite=True)
    assert s.method == "gradcos"


def test_tracin_checkpoint_arguments(tmp_path):
    test = _store(tmp_path / "te", {"a": 4}, 3)
    train = _store(tmp_path / "tr", {"a": 4}, 10)
    other = _store(tmp_path / "tr2", {"a": 4}, 11)
    with pytest.raises(ConfigError, match="checkpoints"):
        score(test, train, "tracin", checkpoints=[(test, train, 0.1)])
    with pytest.raises(StoreMismatchError, match="same train samples"):
        score(None, None, "tracin", checkpoints=[(test, train, 0.1), (test, other, 0.1)])
    with pytest.raises(ConfigError, match="checkpoints= applies"):
        score(test, train, "graddot", checkpoints=[(test, train, 0.1)])
    with pytest.raises(ConfigError, match="needs a test store"):
        score(None, train, "graddot")
