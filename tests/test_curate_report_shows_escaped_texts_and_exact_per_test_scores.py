"""The curation report a person reads: it shows the most detrimental and most helpful training samples with
their texts (HTML-escaped in report.html, one-line pipe-escaped cells in report.md), label and predicted
label, the reference samples each hurts / helps most, and a per-class histogram. The per-test scores it
ranks by equal the two-stage literal reference (``fastinf.score`` then ``aggregate_per_test(how="mean")``)
for every estimator with and without curvature."""
from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_train import make_sentiment, make_tiny_model_dir

N = 36


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from fastinf.curation.curate import curate

    root = tmp_path_factory.mktemp("curate_report")
    model = make_tiny_model_dir(root / "bert")
    ds = make_sentiment(N, seed=7)
    texts = [f"<b>{t}</b> & \"q{i}\" | x" for i, t in enumerate(ds.texts)]
    pq.write_table(pa.table({"text": texts, "label": ds.labels}), root / "train.parquet")
    ref = make_sentiment(9, seed=8)
    pq.write_table(pa.table({"text": [f"ref<{i}> {t}" for i, t in enumerate(ref.texts)], "label": ref.labels}),
                   root / "ref.parquet")
    res = curate(str(root / "train.parquet"), model, out=root / "out", reference=str(root / "ref.parquet"),
                 max_length=24, top=4, n_tests=2, layers="all")
    return res, texts


def test_report_lists_detrimental_and_helpful_texts_escaped(curated) -> None:
    res, texts = curated
    table = pq.read_table(res.results).to_pydict()
    by_rank = {r: i for r, i in zip(table["rank"], table["id"])}
    worst, best = texts[by_rank[1]], texts[by_rank[N]]
    page = res.report_html.read_text()
    md = res.report_md.read_text()
    for t in (worst, best):
        assert html.escape(t) in page and t not in page
        assert t.replace("|", "\\|") in md
    assert "ref&lt;" in page and "<b>" not in page
    assert "Most detrimental" in md and "Most helpful" in md and "hurts most" in md and "helps most" in md
    assert "Score histogram per class" in md and "(36 samples)" not in md      # two classes, split counts
    assert sum(int(line.split("(")[1].split()[0]) for line in md.splitlines()
               if line.endswith("samples)")) == N
    assert ("histogram.png" in page) == (res.out / "histogram.png").is_file()


@pytest.mark.parametrize("method", ["graddot", "gradcos", "datainf"])
def test_per_test_scores_equal_the_two_stage_mean(curated, method, tmp_path) -> None:
    import fastinf
    from fastinf.curation.scoring import per_test_scores
    from fastinf.store import GradientStore

    res, _ = curated
    train = GradientStore.open(res.out / "stores" / "train")
    ref = GradientStore.open(res.out / "stores" / "reference")
    rows = np.random.default_rng(0).choice(train.n, size=5, replace=False)
    got = per_test_scores(train, ref, rows, method=method, group="middle")
    scores = fastinf.score(ref, train, method=method, layers="middle", precision="float64")
    expect = fastinf.aggregate_per_test(scores, "mean", dtype="float64").get("all", "mean")[:, rows].T
    # the score set holds float32 values (computed in float64): agreement to float32 rounding
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())
