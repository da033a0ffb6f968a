"""`fastinf run` on the fused path (the default: score -> aggregate in one pass, no per-unit score sets) gives
the metric rows of the two-stage path (``score.fused: false``) on the tiny pipeline config: every (method,
how, group) row, per-unit and per-block rows (the layer plots) included; rank / vote numbers are equal
exactly, mean to float rounding. The fused path writes one result file per method and no score set, and a
change of aggregation reruns only the evaluate stage."""
from __future__ import annotations

import pytest

from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from test_pipeline import METHODS, tiny_config

METRICS = ("ndr@30", "auc_ndr", "roc_auc")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _key(r: dict) -> tuple:
    return r["method"], r["how"], r["group"], r["kind"]


@pytest.mark.slow
def test_fused_run_equals_two_stage_run(tmp_path):
    data = tiny_config(tmp_path)
    two = run_experiment(RunConfig.from_dict(data))
    assert (tmp_path / "run" / "seed-0" / "scores" / "graddot" / "manifest.json").is_file()
    data["score"] = {"methods": METHODS}                                  # the default: fused
    assert RunConfig.from_dict(data).score.fused is True
    fused = run_experiment(RunConfig.from_dict(data))
    assert "seed-0/evaluate" in fused.stages_run
    assert not [s for s in fused.stages_run if "score_" in s or "extract" in s or "train" in s]
    rows2 = {_key(r): r for r in two.results["rows"]}
    rowsf = {_key(r): r for r in fused.results["rows"]}
    assert rows2.keys() == rowsf.keys()
    kinds = {k[3] for k in rowsf}
    assert {"group", "block", "unit", "baseline"} <= kinds
    for key, r in rows2.items():
        for m in METRICS:
            if key[1] in ("rank", "vote", "-"):
                assert rowsf[key][m] == r[m], (key, m)
            else:
                assert rowsf[key][m] == pytest.approx(r[m], abs=1e-9), (key, m)
    sdir = tmp_path / "run" / "seed-0"
    for m in METHODS:
        assert (sdir / "scores" / f"{m}.fused.parquet").is_file()
        assert (tmp_path / "run" / f"layers_{m}.png").stat().st_size > 1000
    assert not list(sdir.glob("scores/.*fused-state*"))
    costs = fused.results["costs"]
    assert all(c["score_s"] is not None and c["score_s"] > 0 for c in costs)

    data["aggregate"] = {**data["aggregate"], "how": ["rank"]}
    third = run_experiment(RunConfig.from_dict(data))
    assert third.stages_run == ["seed-0/evaluate"]
    for r in third.results["rows"]:
        if r["kind"] != "baseline":
            assert r["how"] == "rank" and r["ndr@30"] == rows2[_key(r)]["ndr@30"]


def test_score_fused_must_be_a_bool():
    from fastinf.errors import ConfigError

    with pytest.raises(ConfigError, match="score.fused"):
        RunConfig.from_dict({"score": {"fused": "yes"}})
