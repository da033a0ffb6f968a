"""`fastinf curate` end to end on a tiny model, for every input format (parquet, jsonl, csv, save_to_disk):
``--drop-lowest P`` writes the same format back without exactly the lowest-ranked P% of the scored rows
(row order, ids and every untouched column preserved; held-out reference rows kept), ``--flag-lowest P``
keeps every row and adds the ``fastinf_*`` columns; the results table holds the documented columns; and
the fused ``mean`` scores equal a literal numpy reference computed from the two stores."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_train import make_sentiment, make_tiny_model_dir

N, FRACTION, P = 40, 0.25, 10.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("curate_model") / "bert")


def columns(n: int = N) -> dict[str, list]:
    ds = make_sentiment(n, seed=3)
    return {"uid": [f"u{i:03d}" for i in range(n)], "text": ds.texts, "label": [int(v) for v in ds.labels],
            "note": [f"note, \"{i}\"" for i in range(n)]}


def write_source(kind: str, root: Path, cols: dict[str, list]) -> Path:
    """The same table as a .parquet / .jsonl / .csv file or a datasets save_to_disk directory."""
    n = len(cols["text"])
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if kind == "parquet":
        pq.write_table(pa.table(cols), root / "train.parquet")
        return root / "train.parquet"
    if kind == "jsonl":
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "train.jsonl"
    if kind == "csv":
        with open(root / "train.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cols))
            w.writeheader()
            w.writerows(rows)
        return root / "train.csv"
    import datasets

    datasets.Dataset.from_dict(cols).save_to_disk(str(root / "train_hf"))
    return root / "train_hf"


def read_back(kind: str, path: Path) -> dict[str, list]:
    if kind == "parquet":
        return pq.read_table(path).to_pydict()
    if kind == "jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif kind == "csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        import datasets

        return datasets.load_from_disk(str(path)).to_dict()
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "hf_disk"])
def test_drop_and_flag_write_the_input_format_back(kind, model_dir, tmp_path) -> None:
    from fastinf.curation.curate import curate

    cols = columns()
    src = write_source(kind, tmp_path, cols)
    res = curate(str(src), model_dir, out=tmp_path / "out", reference_fraction=FRACTION, drop_lowest=P,
                 flag_lowest=P, max_length=16, how="rank", seed=1)
    table = pq.read_table(res.results).to_pydict()
    assert list(table) == ["id", "text", "label", "predicted_label", "loss", "score", "rank", "flagged"]
    n_ref = int(math.floor(FRACTION * N + 0.5))
    n_scored = N - n_ref
    n_drop = int(math.floor(P * n_scored / 100 + 0.5))
    assert len(table["id"]) == n_scored and sorted(table["rank"]) == list(range(1, n_scored + 1))
    order = np.lexsort((np.asarray(table["id"]), np.asarray(table["score"])))
    lowest = sorted(np.asarray(table["id"])[order[:n_drop]].tolist())
    assert sorted(i for i, f in zip(table["id"], table["flagged"]) if f) == lowest
    assert [cols["text"][i] for i in table["id"]] == table["text"]

    cleaned = read_back(kind, res.cleaned)
    kept = [i for i in range(N) if i not in set(lowest)]
    assert len(cleaned["uid"]) == N - n_drop
    assert cleaned["uid"] == [cols["uid"][i] for i in kept]          # ids and order preserved
    assert cleaned["note"] == [cols["note"][i] for i in kept]        # untouched columns verbatim
    assert [str(v) for v in cleaned["label"]] == [str(cols["label"][i]) for i in kept]
    assert set(cleaned) == set(cols)                                  # no columns added by drop

    flagged = read_back(kind, res.flagged)
    assert flagged["uid"] == cols["uid"] and flagged["note"] == cols["note"]
    assert {"fastinf_score", "fastinf_rank", "fastinf_flagged", "fastinf_reference"} <= set(flagged)
    marks = [str(v).lower() in ("true", "1") for v in flagged["fastinf_flagged"]]
    assert sorted(i for i, m in enumerate(marks) if m) == lowest
    refs = [str(v).lower() in ("true", "1") for v in flagged["fastinf_reference"]]
    assert sum(refs) == n_ref and not any(r and m for r, m in zip(refs, marks))
    assert res.cleaned.name.startswith("cleaned") and res.flagged.name.startswith("flagged")


def test_fused_mean_scores_equal_a_literal_numpy_reference(model_dir, tmp_path) -> None:
    from fastinf.curation.curate import curate
    from fastinf.store import GradientStore

    src = write_source("parquet", tmp_path, columns())
    res = curate(str(src), model_dir, out=tmp_path / "out", reference_rows=7, how="mean", method="graddot",
                 layers="all", max_length=16, seed=2)
    train = GradientStore.open(tmp_path / "out" / "stores" / "train")
    ref = GradientStore.open(tmp_path / "out" / "stores" / "reference")
    total = np.zeros(train.n)
    for name in train.unit_names:                      # mean over (unit, reference sample) of q . g
        q = ref.gather(name, np.arange(ref.n)).astype(np.float64)
        g = train.gather(name, np.arange(train.n)).astype(np.float64)
        total += (q @ g.T).sum(axis=0)
    expect = total / (len(train.unit_names) * ref.n)
    got = dict(zip(pq.read_table(res.results)["id"].to_pylist(), pq.read_table(res.results)["score"].to_pylist()))
    ids = np.asarray(train.meta.ids)
    np.testing.assert_allclose([got[i] for i in ids], expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    assert res.cleaned is None and res.flagged is None


@pytest.mark.parametrize("kind", ["datasets", "arrow", "rows", "textdataset"])
def test_in_memory_sources_are_written_as_parquet(kind, model_dir, tmp_path) -> None:
    import datasets

    from fastinf.curation.curate import curate
    from fastinf.data import TextDataset

    cols = columns(24)
    source = {"datasets": lambda: datasets.Dataset.from_dict(cols), "arrow": lambda: pa.table(cols),
              "rows": lambda: [{k: v[i] for k, v in cols.items()} for i in range(24)],
              "textdataset": lambda: TextDataset(texts=cols["text"], labels=np.array(cols["label"]))}[kind]()
    res = curate(source, model_dir, out=tmp_path / "out", reference_rows=4, drop_lowest=25, max_length=16)
    assert res.cleaned.name == "cleaned.parquet"
    back = pq.read_table(res.cleaned).to_pydict()
    dropped = set(res.ranking.rows[res.ranking.rank <= 5].tolist())
    assert len(back["text"]) == 19 and back["text"] == [t for i, t in enumerate(cols["text"]) if i not in dropped]
    if kind != "textdataset":
        assert back["uid"] == [u for i, u in enumerate(cols["uid"]) if i not in dropped]
    assert np.array_equal(res.keep, [i not in dropped for i in range(24)])
