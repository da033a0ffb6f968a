"""Named held-out splits (``data.heldout``): select / influence / evaluation are disjoint (``separate``,
fractions), sized ``floor(f * n)``, deterministic by seed and different for another seed; ``paper`` halves the
pool (influence vs selection = evaluation); ``shared`` is the earlier one-set behaviour; ``load_splits`` still
returns (train, influence); bad settings are ConfigErrors."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.errors import ConfigError, DataError
from fastinf.experiment.config import DataConfig, RunConfig
from fastinf.experiment.splits import SPLIT_NAMES, heldout_indices, load_named_splits, load_splits

NAMES = ("select", "influence", "evaluation")


def test_fraction_splits_are_disjoint_sized_and_seeded() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(10, 300))
        f = rng.dirichlet(np.ones(4))[:3] * rng.uniform(0.5, 0.999)
        f = np.maximum(f, 0.02)
        spec = {k: float(v) for k, v in zip(NAMES, f / max(1.0, f.sum() + 1e-6))}
        seed = int(rng.integers(1000))
        rows = heldout_indices(n, spec, seed)
        again = heldout_indices(n, spec, seed)
        assert all(np.array_equal(rows[k], again[k]) for k in NAMES), "not deterministic by seed"
        for k in NAMES:
            assert len(rows[k]) == max(1, int(np.floor(spec[k] * n + 1e-9)))
            assert np.all(np.diff(rows[k]) > 0) and rows[k].min() >= 0 and rows[k].max() < n
        union = np.concatenate([rows[k] for k in NAMES])
        assert len(np.unique(union)) == len(union), "the splits overlap"
        other = heldout_indices(n, spec, seed + 1)
        if n >= 30:
            assert any(not np.array_equal(rows[k], other[k]) for k in NAMES), "the seed does not matter"


def test_presets() -> None:
    sep = heldout_indices(90, "separate", 3)
    assert [len(sep[k]) for k in NAMES] == [30, 30, 30]
    assert len(np.unique(np.concatenate(list(sep.values())))) == 90
    paper = heldout_indices(91, "paper", 3)
    assert len(paper["influence"]) == 45 and np.array_equal(paper["select"], paper["evaluation"])
    assert np.array_equal(np.sort(np.concatenate([paper["influence"], paper["select"]])), np.arange(91))
    shared = heldout_indices(7, "shared", 3)
    assert all(np.array_equal(shared[k], np.arange(7)) for k in NAMES)
    with pytest.raises(DataError, match="too few"):
        heldout_indices(2, "separate", 0)


def _cfg(tmp_path, heldout, seed: int = 0) -> RunConfig:
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("dev", 60)):
        rows = "".join(f"text {split} {i}\t{int(rng.integers(2))}\n" for i in range(n))
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    return RunConfig(data=DataConfig(train={"path": str(tmp_path), "split": "train"},
                                     test={"path": str(tmp_path), "split": "dev"}, n_test=54, split_seed=seed,
                                     heldout=heldout))


def test_loaded_splits_are_disjoint_cover_the_pool_and_keep_load_splits(tmp_path) -> None:
    s = load_named_splits(_cfg(tmp_path, {"select": 0.2, "influence": 0.5, "evaluation": 0.3}))
    ids = {k: set(np.asarray(s.get(k).ids).tolist()) for k in NAMES}
    assert [len(ids[k]) for k in NAMES] == [10, 27, 16]
    assert not (ids["select"] & ids["influence"] or ids["select"] & ids["evaluation"]
                or ids["influence"] & ids["evaluation"])
    texts = {k: list(s.get(k).texts) for k in NAMES}
    assert all(t.startswith("text dev") for k in NAMES for t in texts[k])
    train, test = load_splits(_cfg(tmp_path, {"select": 0.2, "influence": 0.5, "evaluation": 0.3}))
    assert list(test.texts) == texts["influence"] and len(train) == 50
    again = load_named_splits(_cfg(tmp_path, {"select": 0.2, "influence": 0.5, "evaluation": 0.3}))
    assert all(list(again.get(k).texts) == texts[k] for k in NAMES), "not deterministic"
    shared = load_named_splits(_cfg(tmp_path, "shared"))
    assert shared.select is shared.influence is shared.evaluation and len(shared.influence) == 54
    paper = load_named_splits(_cfg(tmp_path, "paper"))
    assert paper.evaluation is paper.select and len(paper.influence) == 27
    assert SPLIT_NAMES == ("train", "select", "influence", "evaluation")
    with pytest.raises(ConfigError, match="unknown split"):
        shared.get("dev")


@pytest.mark.parametrize("bad", ["thirds", {"select": 0.5, "influence": 0.6, "evaluation": 0.1},
                                 {"select": 0.5, "influence": 0.2}, {"select": 0, "influence": 0.5, "evaluation": 0.2}])
def test_bad_heldout_settings_are_config_errors(bad) -> None:
    with pytest.raises(ConfigError, match="data.heldout"):
        DataConfig(heldout=bad)
