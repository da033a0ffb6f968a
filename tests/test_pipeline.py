"""`fastinf run` end to end on a tiny LoRA BERT: every artifact and key is produced, the report's
numbers equal a direct recomputation from the saved scores, stages are cached and resumable, and the
config hash is written into every artifact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastinf.cli.app import main
from fastinf.experiment.config import RunConfig, config_hash
from fastinf.errors import ConfigError
from fastinf.experiment.pipeline import run_experiment
from test_train import make_sentiment, make_tiny_model_dir

METHODS, HOWS = ["graddot", "gradcos", "datainf"], ["mean", "rank", "vote"]
GROUPS = ["first", "q1", "q2", "q3", "q4", "last", "all"]


def _write_tsv(path: Path, n: int, seed: int) -> None:
    ds = make_sentiment(n, seed)
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(ds.texts, ds.labels)))


def tiny_config(root: Path) -> dict:
    """A config dict for a 4-block LoRA BERT on 64 / 16 synthetic sentences (one seed)."""
    model_dir = make_tiny_model_dir(root / "bert", n_layers=4)     # every quartile q1..q4 holds one block
    (root / "data").mkdir(exist_ok=True)
    _write_tsv(root / "data" / "train.tsv", 64, 0)
    _write_tsv(root / "data" / "dev.tsv", 16, 1)
    return {
        "name": "tiny", "out": str(root / "run"), "seeds": [0],
        "data": {"train": {"path": str(root / "data"), "split": "train"},
                 "test": {"path": str(root / "data"), "split": "dev"}},
        "noise": {"rate": 0.25},
        "model": {"name": model_dir, "max_length": 16},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2,
                  "lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}},
        "extract": {"layers": "all", "proj": "4x4", "batch_size": 64, "cost_samples": 16, "cost_repeats": 1},
        "score": {"methods": METHODS, "fused": False},     # the two-stage path: tests read its score sets
        "aggregate": {"how": HOWS, "groups": GROUPS},
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, which only spin against other processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = tiny_config(root)
    (root / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = RunConfig.from_dict(data)
    return root, cfg, run_experiment(cfg)


def test_run_writes_report_plots_and_results_with_every_key(tiny_run):
    root, cfg, res = tiny_run
    out = root / "run"
    for name in ["report.md", "report.html", "results.json", "results.parquet", "config.yaml", "cost_quality.png"]:
        assert (out / name).is_file(), name
    for m in METHODS:
        assert (out / f"layers_{m}.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    for key in ["rows", "summary", "metrics", "costs", "setup", "train", "timings", "recommendation",
                "config", "config_hash", "fastinf_version"]:
        assert key in results, key
    assert results["metrics"] == ["ndr@30", "auc_ndr", "roc_auc"]
    rows = results["rows"]
    for r in rows:
        assert {"seed", "method", "how", "group", "kind", "ndr@30", "auc_ndr", "roc_auc"} <= set(r)
    # methods x aggregations x (named groups + each block + each unit), plus the baselines
    from fastinf.store import GradientStore

    units = GradientStore.open(out / "seed-0" / "stores" / "train").units
    blocks = {u.block for u in units}
    expected = len(METHODS) * len(HOWS) * (len(GROUPS) + len(blocks) + len(units)) + 2
    assert len(rows) == expected
    assert {r["group"] for r in rows if r["kind"] == "group"} == set(GROUPS)
    assert {r["method"] for r in rows if r["kind"] == "baseline"} == {"loss", "random"}
    assert {u.kind for u in units} >= {"embedding", "lora_a", "lora_b", "head"}, "LoRA units must be scored"
    assert [c["group"] for c in results["costs"]] == GROUPS
    assert all(c["bytes_per_sample"] > 0 and c["extract_share"] > 0 for c in results["costs"])
    import pyarrow.parquet as pq

    assert pq.read_table(out / "results.parquet").num_rows == len(rows)
    assert "Recommended layers" in (out / "report.md").read_text()
    assert "<img" in (out / "report.html").read_text()


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks, ties averaged: the slow obvious way."""
    r = np.empty(x.size)
    for i, v in enumerate(x):
        r[i] = (x < v).sum() + ((x == v).sum() - 1) / 2
    return r


def _reference_aggregate(per_unit: list[np.ndarray], how: str, vote_p: float = 0.2) -> np.ndarray:
    rankers = [row.astype(np.float64) for s in per_unit for row in s]      # every (unit, test sample)
    n = rankers[0].size
    if how == "mean":
        return np.mean(rankers, axis=0)
    ranks = [_avg_ranks(r) for r in rankers]
    if how == "rank":
        return np.mean(ranks, axis=0)
    k = int(np.floor(vote_p * n + 0.5))
    return -np.sum([np.maximum(0, k - r) for r in ranks], axis=0)


def _reference_ndr(scores: np.ndarray, mask: np.ndarray, p: float) -> float:
    """Noisy fraction among the k lowest; the tie group straddling k counts in expectation (random order)."""
    k = int(np.floor(p * scores.size / 100 + 0.5))
    kth = np.sort(scores)[k - 1]
    below, tied = scores < kth, scores == kth
    expected = mask[below].sum() + (k - below.sum()) * mask[tied].sum() / tied.sum()
    return expected / mask.sum()


def test_report_numbers_equal_a_direct_recomputation(tiny_run):
    root, cfg, res = tiny_run
    from fastinf.scoring.scores import ScoreSet
    from fastinf.extraction.units import select

    out = root / "run"
    results = json.loads((out / "results.json").read_text())
    mask = np.load(out / "seed-0" / "noise.npz")["mask"]
    assert mask.sum() == 16
    md = (out / "report.md").read_text()
    checked = 0
    for method in ("graddot", "datainf"):
        ss = ScoreSet.open(out / "seed-0" / "scores" / method)
        for group in ("first", "q2", "all"):
            names = [u.name for u in select(ss.units, group)]
            per_unit = [np.asarray(ss.unit_scores(n)) for n in names]
            for how in HOWS:
                ref = _reference_ndr(_reference_aggregate(per_unit, how), mask, 30)
                row = next(r for r in results["rows"] if (r["method"], r["how"], r["group"]) == (method, how, group))
                assert row["ndr@30"] == pytest.approx(ref, abs=1e-12), (method, how, group)
                summ = next(s for s in results["summary"]
                            if (s["method"], s["how"], s["group"], s["kind"]) == (method, how, group, "group"))
                assert summ["ndr@30_mean"] == row["ndr@30"]
                assert f"| {group} |" in md and f"{ref:.3f}" in md
                checked += 1
    assert checked == 18
    # the loss baseline: the training loss of the scored model, highest loss = most detrimental
    from fastinf.store import GradientStore

    loss = np.asarray(GradientStore.open(out / "seed-0" / "stores" / "train").meta.loss, dtype=np.float64)
    row = next(r for r in results["rows"] if r["method"] == "loss")
    assert row["ndr@30"] == pytest.approx(_reference_ndr(-loss, mask, 30), abs=1e-12)


def test_config_hash_is_in_every_artifact(tiny_run):
    root, cfg, res = tiny_run
    out = root / "run"
    h = config_hash(cfg)
    assert json.loads((out / "results.json").read_text())["config_hash"] == h
    markers = list((out / "seed-0").glob("*.done.json"))
    assert len(markers) >= 8
    assert all(json.loads(p.read_text())["config_hash"] == h for p in markers)
    assert h in (out / "report.md").read_text()
    assert RunConfig.from_yaml(out / "config.yaml") == cfg, "config.yaml must replay the run"


def test_rerun_is_cached_and_changing_aggregation_reruns_only_evaluation(tiny_run, capsys):
    root, cfg, res = tiny_run
    assert main(["run", str(root / "config.yaml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "recommended layers" in printed and "; ran 0" in printed
    cfg2 = RunConfig.from_dict({**cfg.to_dict(), "aggregate": {**cfg.to_dict()["aggregate"], "how": ["rank"]}})
    third = run_experiment(cfg2)
    assert third.stages_run == ["seed-0/evaluate"]
    assert {r["how"] for r in third.results["rows"] if r["kind"] != "baseline"} == {"rank"}


def test_bad_config_names_the_key_and_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 2\n")
    with pytest.raises(ConfigError, match=r"'train\.epocs'.*valid keys of train: epochs, batch_size"):
        RunConfig.from_yaml(bad)
    assert main(["run", str(bad)]) == 2
    assert "train.epocs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot read config"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match=r"noise.rate must lie in \[0, 1\)"):
        RunConfig.from_dict({"noise": {"rate": 1.2}})
    with pytest.raises(ConfigError, match="score.methods"):
        RunConfig.from_dict({"score": {"methods": ["tracin_ew"]}})


def test_single_class_data_and_empty_group_are_refused(tmp_path):
    data = tiny_config(tmp_path)
    (tmp_path / "data" / "one.tsv").write_text("sentence\tlabel\n" + "good movie\t1\n" * 20)
    one = {**data, "data": {**data["data"], "train": {"path": str(tmp_path / "data" / "one.tsv")}}}
    from fastinf.errors import DataError

    with pytest.raises(DataError, match="single class"):
        run_experiment(RunConfig.from_dict(one))


def test_filter_and_retrain_compares_influence_random_and_oracle_removal(tiny_run):
    root, cfg, res = tiny_run
    d = cfg.to_dict()
    d["evaluate"]["filter_retrain"] = {"enabled": True, "p": 25.0, "method": "datainf", "how": "rank",
                                       "group": "all", "epochs": 1}
    out = run_experiment(RunConfig.from_dict(d))
    # (evaluate may re-run: the previous test changed the aggregations of the shared run directory)
    assert "seed-0/retrain" in out.stages_run
    assert set(out.stages_run) <= {"seed-0/evaluate", "seed-0/retrain"}, "no earlier stage may be redone"
    rows = {r["strategy"]: r for r in out.results["filter_retrain"]}
    assert set(rows) == {"none", "influence", "random", "oracle"}
    mask = np.load(root / "run" / "seed-0" / "noise.npz")["mask"]
    assert rows["oracle"]["n_removed"] == rows["oracle"]["noisy_removed"] == mask.sum()
    assert rows["influence"]["n_removed"] == rows["random"]["n_removed"] == 16 and rows["none"]["n_removed"] == 0
    # the influence removal is the lowest 25% by (datainf, rank, all), recomputed from the saved scores
    from fastinf.scoring.scores import ScoreSet

    ss = ScoreSet.open(root / "run" / "seed-0" / "scores" / "datainf")
    agg = _reference_aggregate([np.asarray(ss.unit_scores(n)) for n in ss.unit_names], "rank")
    assert rows["influence"]["noisy_removed"] == mask[np.argsort(agg, kind="stable")[:16]].sum()
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert "Filter and retrain" in (root / "run" / "report.md").read_text()


def test_set_overrides_apply_to_nested_keys_and_are_validated():
    from fastinf.cli.run import apply_overrides

    d = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=2", "seeds=[0, 1]", "train.lora=null",
                                                   "aggregate.how=[rank]"])
    cfg = RunConfig.from_dict(d)
    assert (cfg.train.epochs, cfg.seeds, cfg.train.lora, cfg.aggregate.how) == (2, [0, 1], None, ["rank"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        RunConfig.from_dict(apply_overrides({}, ["train.epoch=2"]))


def test_example_configs_parse_and_the_demo_config_matches_the_embedded_one():
    from fastinf.experiment.config import demo_config

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert {p.name for p in paths} >= {"sms_demo.yaml", "paper_sst2.yaml", "paper_mrpc.yaml"}
    cfgs = {p.stem: RunConfig.from_yaml(p) for p in paths}
    assert cfgs["sms_demo"] == demo_config(cfgs["sms_demo"].out)
    lora = cfgs["paper_sst2"].train.lora
    # the paper configs' recipe (issue 15: models that learn): LoRA r=8 on attention and dense, lr: auto
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 8.0, ["query", "key", "value", "dense"])
    assert cfgs["paper_sst2"].train.lr == "auto" and cfgs["paper_sst2"].data.heldout != "shared"
