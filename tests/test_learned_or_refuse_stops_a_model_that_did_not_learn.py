"""Learned-or-refuse: a fine-tuned model that does not beat the majority class stops ``fastinf run`` after
training (one-line error, exit 2, nothing extracted) unless ``evaluate.require_learned: false``; the check's
binomial tail equals scipy's on fixed inputs, and its verdicts follow their definition."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fastinf.experiment.learned import NotLearnedError, binomial_sf, check_learned, permutation_p


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (7, 10, 0.5), (60, 100, 0.5), (300, 408, 0.684), (11, 10, 0.2),
                                   (45, 50, 0.9)])
def test_binomial_tail_equals_scipy(k, n, p) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert binomial_sf(k, n, p) == pytest.approx(float(stats.binom.sf(k - 1, n, p)), rel=1e-9, abs=1e-300)


def test_verdicts_follow_the_definition() -> None:
    labels = np.array([1] * 70 + [0] * 30)
    majority_only = check_learned(labels, predictions=np.ones(100, np.int64))
    assert majority_only.verdict == "not_learned" and majority_only.majority == 0.7
    assert majority_only.p_permutation == 1.0, "a constant predictor is never associated with the labels"
    assert "evaluate.require_learned: false" in majority_only.message and "train.epochs" in majority_only.message
    good = labels.copy()
    good[:5] = 0                                    # 95% accuracy
    assert check_learned(labels, predictions=good).verdict == "learned"
    assert check_learned(labels, accuracy=0.72).verdict == "not_learned", "not significantly above 0.7"
    assert check_learned(labels[:20], accuracy=0.2).verdict == "inconclusive"
    rng = np.random.default_rng(0)
    assert permutation_p(rng.integers(0, 2, 200), rng.integers(0, 2, 200), n_perm=200) > 0.01


def _config(root: Path, require: bool | None) -> dict:
    """A tiny BERT that cannot learn: random labels, a learning rate of 1e-9; 40 held-out samples."""
    from test_train import make_tiny_model_dir

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 48), ("dev", 40)):
        rows = "".join(f"good bad w{i} x\t{int(rng.integers(2))}\n" for i in range(n))
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    cfg = {"name": "unlearned", "out": str(root / "run"), "seeds": [0],
           "data": {"train": {"path": str(data), "split": "train"}, "test": {"path": str(data), "split": "dev"}},
           "noise": {"rate": 0.25}, "model": {"name": make_tiny_model_dir(root / "bert"), "max_length": 12},
           "train": {"epochs": 1, "batch_size": 16, "lr": 1e-9, "lora": None},
           "extract": {"layers": "all", "proj": "2x2", "batch_size": 64, "cost_repeats": 0},
           "score": {"methods": ["graddot"], "fused": False},
           "aggregate": {"how": ["mean"], "groups": ["all"], "per_block": False}}
    if require is not None:
        cfg["evaluate"] = {"require_learned": require}
    return cfg


def test_fastinf_run_refuses_a_model_that_did_not_learn_unless_overridden(tmp_path, capsys) -> None:
    from fastinf.cli.app import main
    from fastinf.experiment.config import RunConfig
    from fastinf.experiment.pipeline import run_experiment

    cfg = _config(tmp_path, None)
    with pytest.raises(NotLearnedError, match="has not learned the task.*majority-class rate"):
        run_experiment(RunConfig.from_dict(cfg))
    assert not (tmp_path / "run" / "seed-0" / "stores").exists(), "stopped before extraction"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has not learned" in err and len([ln for ln in err.splitlines() if "not learned" in ln]) == 1
    assert err.splitlines()[-1].count("has not learned") == 1, "one line"
    res = run_experiment(RunConfig.from_dict(_config(tmp_path, False)))       # the override: goes on
    assert res.results["train"][0]["learned"]["verdict"] == "not_learned"
    assert any(r["kind"] == "group" for r in res.results["rows"])
