"""`fastinf run` with a 12-setting `evaluate.retrain_grid` on a tiny LoRA BERT: every setting is retrained once
(in a 2-process pool), from the held-out pool split deterministically into disjoint influence and evaluation
parts; each setting removed exactly the p% lowest of its score; the group cancellation ratio equals a literal
recomputation from the train store; a simulated kill (a setting's result file and the stage marker gone)
retrains only that setting; the summary's claim-3 correlations equal scipy's Spearman over the per-setting
result files; the claims are printed by `fastinf run` and written into the report; a bad grid fails before
any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from test_pipeline import _write_tsv, tiny_config

GROUPS = ["first", "middle", "last", "all"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(root, workers=2):
    data = tiny_config(root)
    _write_tsv(root / "data" / "dev.tsv", 48, 1)        # 24 evaluation samples: retrained accuracies differ
    data["train"]["epochs"] = 3
    data["score"] = {"methods": ["graddot"], "baselines": ["loss", "random"]}
    data["aggregate"] = {"how": ["mean", "rank", "vote"], "groups": GROUPS, "per_block": False}
    data["extract"]["cost_repeats"] = 0
    data["evaluate"] = {"require_learned": False, "retrain_grid": {"enabled": True, "p": [20.0], "references": False, "workers": workers,
                                         "n_boot": 300}}
    return data


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    data = _config(root)
    (root / "config.yaml").write_text(yaml.safe_dump(data))
    lines: list[str] = []
    res = run_experiment(RunConfig.from_dict(data), echo=lines.append)
    return root, data, res, lines


def _results_files(root):
    return sorted((root / "run" / "seed-0" / "retrain_grid" / "results").glob("*.json"))


def test_every_setting_retrained_on_a_disjoint_evaluation_split(grid_run):
    root, data, res, lines = grid_run
    files = _results_files(root)
    assert len(files) == 12 and len(res.results["retrain_grid"]) == 12
    rec = json.loads((root / "run" / "seed-0" / "retrain_grid" / "grid.json").read_text())
    inf, ev = set(rec["influence_rows"]), set(rec["evaluation_rows"])
    assert not inf & ev and inf | ev == set(range(48)) and len(ev) == 24
    rows = res.results["retrain_grid"]
    assert {(r["how"], r["group"]) for r in rows} == {(h, g) for h in ["mean", "rank", "vote"] for g in GROUPS}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n_removed"] == round(0.2 * 64) for r in rows)
    with np.load(root / "run" / "seed-0" / "retrain_grid" / "scores.npz") as z:
        from fastinf.experiment.retrain_grid import Setting, _drop

        for r in rows:
            s = Setting(r["strategy"], r["method"], r["how"], r["group"], r["p"])
            sc = z[f"graddot|{r['how']}|{r['group']}"]
            drop = _drop(s, {("graddot", r["how"], r["group"]): sc}, 64, 0)
            assert np.all(sc[drop].max() <= np.delete(sc, drop).min())     # the k lowest were removed
    assert any("ETA" in ln for ln in lines)


def test_group_cancellation_equals_a_literal_recomputation(grid_run):
    root, data, res, _ = grid_run
    from fastinf.extraction.units import select
    from fastinf.store import GradientStore

    store = GradientStore.open(root / "run" / "seed-0" / "stores" / "train")
    for r in res.results["cancellation"]:
        names = [u.name for u in select(store.units, r["group"])]
        g = np.concatenate([np.asarray(store.features(n), np.float64) for n in names], axis=1)
        assert r["cancellation"] == pytest.approx(np.abs(g).sum() / np.abs(g.sum(0)).sum(), rel=1e-9)
        assert r["cancellation_l2"] == pytest.approx(np.linalg.norm(g, axis=1).sum() / np.linalg.norm(g.sum(0)),
                                                     rel=1e-9)
    sel = res.results["selfinf"][0]
    assert sel["method"] == "selfinf" and 0.0 <= sel["ndr@30"] <= 1.0


def test_claim3_correlations_equal_scipy_over_the_result_files(grid_run):
    root, data, res, _ = grid_run
    rows = [json.loads(f.read_text()) for f in _results_files(root)]
    acc = [r["accuracy"] for r in rows]
    summary = json.loads((root / "run" / "results.json").read_text())
    c3 = next(c for c in summary["claims"]["claims"] if c["claim"] == "3")
    assert c3["settings"] == 12
    for key, vals in (("ndr", [r["ndr"] for r in rows]), ("auc_ndr", [r["auc_ndr"] for r in rows]),
                      ("neg_cancellation", [-r["cancellation"] for r in rows])):
        want = spearmanr(acc, vals).statistic
        assert np.isfinite(want) and c3["spearman"][key]["rho"] == pytest.approx(want, abs=1e-12), key
    d = c3["spearman"]["ndr"]["rho"] - c3["spearman"]["neg_cancellation"]["rho"]
    assert c3["rho_diff"] == pytest.approx(d) and c3["ci95"][0] <= c3["ci95"][1]
    assert {c["claim"] for c in summary["claims"]["claims"]} == {"1", "1b", "2a", "2b", "3"}
    md = (root / "run" / "report.md").read_text()
    for title in ("The paper's claims on this run", "Retrain grid (claim 3)", "Cancellation ratio per group"):
        assert title in md


def test_a_killed_grid_resumes_only_the_missing_setting_and_prints_the_claims(grid_run, capsys):
    root, data, res, _ = grid_run
    files = _results_files(root)
    victim = files[5]
    before = {f.name: (f.stat().st_mtime_ns, f.read_text()) for f in files}
    victim.unlink()
    (root / "run" / "seed-0" / "retrain_grid.done.json").unlink()      # killed before the stage finished
    data = _config(root, workers=1)
    (root / "config.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(root / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "1 of 12 settings to retrain" in out
    for line in ("Claim 1 —", "Claim 1b —", "Claim 2a —", "Claim 2b —", "Claim 3 —"):
        assert line in out, line
    for f in _results_files(root):
        if f.name != victim.name:
            assert f.stat().st_mtime_ns == before[f.name][0], f.name
    again = json.loads(victim.read_text())
    old = json.loads(before[victim.name][1])
    assert again["accuracy"] == old["accuracy"] and again["recipe"] == old["recipe"]


def test_a_bad_grid_fails_before_any_work(tmp_path):
    data = _config(tmp_path)
    data["evaluate"]["retrain_grid"]["methods"] = ["gradcos"]
    with pytest.raises(ConfigError, match="not in score.methods"):
        run_experiment(RunConfig.from_dict(data))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="percentages"):
        RunConfig.from_dict({"evaluate": {"retrain_grid": {"p": [0]}}})
    data["evaluate"]["retrain_grid"] = {"enabled": True, "how": ["median"]}
    with pytest.raises(ConfigError, match="retrain_grid.how"):
        run_experiment(RunConfig.from_dict(data))


def test_named_heldout_splits_give_the_grid_its_evaluation_split(tmp_path):
    from fastinf.experiment.retrain_grid import grid_heldout
    from fastinf.experiment.splits import load_named_splits

    data = _config(tmp_path)
    data["data"]["heldout"] = "separate"
    cfg = RunConfig.from_dict(data)
    named = load_named_splits(cfg)
    select, evaluation, rows, rec = grid_heldout(cfg, named.influence)
    assert rows is None and rec["heldout"] == "separate"
    assert evaluation.fingerprint() == named.evaluation.fingerprint()
    assert select.fingerprint() == named.select.fingerprint()
    ids = [set(np.asarray(d.ids).tolist()) for d in (named.influence, select, evaluation)]
    assert not (ids[0] & ids[2]) and not (ids[1] & ids[2])
