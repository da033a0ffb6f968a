"""`fastinf curate` is resumable like the other stages: a rerun of the same request recomputes nothing and
gives the same files; a changed percentage reruns only the write stage; a run that died after extraction
reuses the stores; a fine-tune recipe is trained once, and on noisy labels its flagged rows are mostly
the flipped ones."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_train import make_sentiment, make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("curate_rerun") / "bert")


def _source(tmp_path, n: int = 40, flip: np.ndarray | None = None):
    ds = make_sentiment(n, seed=5)
    labels = np.asarray(ds.labels).copy()
    if flip is not None:
        labels[flip] = 1 - labels[flip]
    pq.write_table(pa.table({"text": ds.texts, "label": labels}), tmp_path / "train.parquet")
    return str(tmp_path / "train.parquet")


def test_rerun_recomputes_nothing_and_a_new_percentage_rewrites_only_outputs(model_dir, tmp_path) -> None:
    from fastinf.curation.curate import curate

    src = _source(tmp_path)
    kw = dict(out=tmp_path / "out", reference_fraction=0.2, max_length=16)
    first = curate(src, model_dir, flag_lowest=10, **kw)
    assert [s.split("/")[-1] for s in first.ran] == ["extract_train", "extract_reference", "influence", "write"]
    before = {p.name: p.read_bytes() for p in (first.results, first.report_md, first.flagged)}
    again = curate(src, model_dir, flag_lowest=10, **kw)
    assert again.ran == [] and len(again.cached) == 4
    assert {p.name: p.read_bytes() for p in (again.results, again.report_md, again.flagged)} == before
    other = curate(src, model_dir, flag_lowest=25, **kw)
    assert [s.split("/")[-1] for s in other.ran] == ["write"]
    assert other.ranking.flagged.sum() == 8 and np.array_equal(other.ranking.score, first.ranking.score)


def test_a_run_killed_after_extraction_reuses_the_stores(model_dir, tmp_path, monkeypatch) -> None:
    import fastinf.curation.scoring as scoring
    from fastinf.curation.curate import curate

    src = _source(tmp_path)
    kw = dict(out=tmp_path / "out", reference_rows=8, max_length=16, how="vote")
    real = scoring.influence_scores

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "influence_scores", dies)
    with pytest.raises(KeyboardInterrupt):
        curate(src, model_dir, **kw)
    monkeypatch.setattr(scoring, "influence_scores", real)
    res = curate(src, model_dir, **kw)
    assert [s.split("/")[-1] for s in res.ran] == ["influence", "write"]
    fresh = curate(src, model_dir, **{**kw, "out": tmp_path / "fresh"})
    np.testing.assert_array_equal(res.ranking.score, fresh.ranking.score)


def test_recipe_fine_tunes_once_and_flags_flipped_labels(model_dir, tmp_path) -> None:
    from fastinf.curation.curate import curate

    n = 160
    flip = np.random.default_rng(0).choice(n, size=24, replace=False)
    src = _source(tmp_path, n, flip)
    recipe = {"model": {"name": model_dir, "max_length": 16},
              "train": {"epochs": 3, "batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.2, "lora": None}}
    kw = dict(out=tmp_path / "out", reference_fraction=0.2, recipe=recipe, layers="all", flag_lowest=15, seed=0,
              max_length=16)
    res = curate(src, None, **kw)
    assert [s.split("/")[-1] for s in res.ran][0] == "train" and (tmp_path / "out" / "train" / "train.json").is_file()
    flagged = set(res.ranking.rows[res.ranking.flagged].tolist())
    noisy = set(flip.tolist()) & set(res.ranking.rows.tolist())
    precision = len(flagged & noisy) / len(flagged)
    assert precision >= 2 * len(noisy) / len(res.ranking.rows), (precision, len(noisy))
    assert curate(src, None, **kw).ran == []


def test_overwrite_clears_only_its_own_directory_and_starts_over(model_dir, tmp_path) -> None:
    from fastinf.curation.curate import curate
    from fastinf.errors import ConfigError

    src = _source(tmp_path, n=24)
    kw = dict(out=tmp_path / "out", reference_rows=4, max_length=16, drop_lowest=10)
    first = curate(src, model_dir, **kw)
    again = curate(src, model_dir, overwrite=True, **kw)
    assert len(again.ran) == 4 and np.array_equal(again.ranking.score, first.ranking.score)
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="mine.txt"):
        curate(src, model_dir, overwrite=True, **kw)
    assert (tmp_path / "out" / "mine.txt").read_text() == "x" and (tmp_path / "out" / "results.parquet").is_file()
