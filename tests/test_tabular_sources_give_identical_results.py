"""The same rows give the same dataset and the same store whatever the source: a list of rows, a TextDataset,
a ``datasets.Dataset`` (also after ``select``), an ``IterableDataset``, a ``pyarrow.Table``, a Parquet file (many
small row groups), an Arrow file, a ``save_to_disk`` folder or a jsonl — ids, labels, label names, texts per
batch (ranges and index arrays), fingerprints and extracted features all equal a literal reference."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinf.data import ArrowTextDataset, TextDataset, as_text_dataset, load_dataset_spec
from fastinf.errors import DataError
from tests._tokenizer import random_texts

datasets = pytest.importorskip("datasets")


def _rows(n: int, seed: int, pairs: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    a, b = random_texts(n, seed), random_texts(n, seed + 1)
    ids = rng.permutation(10 * n)[:n] + 7
    out = []
    for i in range(n):
        r = {"sentence1": a[i], "sentence2": b[i]} if pairs else {"text": a[i]}
        r.update(label=["neg", "pos", "mid"][int(rng.integers(0, 3))], uid=int(ids[i]), other=float(i) / 3)
        out.append(r)
    return out


def _sources(rows: list[dict], tmp_path) -> dict:
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=5)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": rows, "table": table, "hf": datasets.Dataset.from_list(rows),
            "iterable": datasets.Dataset.from_list(rows).to_iterable_dataset(), "parquet": str(tmp_path / "d.parquet"),
            "arrow": str(tmp_path / "d.arrow"), "disk": str(tmp_path / "disk"), "jsonl": str(tmp_path / "d.jsonl")}


def _reference(rows: list[dict], pairs: bool) -> dict:
    """The literal expectation: texts as lists, string labels mapped in sorted order, ids from uid."""
    names = sorted({r["label"] for r in rows})
    return {"texts": [r["sentence1" if pairs else "text"] for r in rows],
            "pairs": [r["sentence2"] for r in rows] if pairs else None,
            "labels": np.array([names.index(r["label"]) for r in rows]), "names": names,
            "ids": np.array([r["uid"] for r in rows])}


@pytest.mark.parametrize("pairs", [False, True])
def test_every_source_gives_the_reference_rows_and_batches(tmp_path, pairs) -> None:
    rows = _rows(37, 3 + pairs, pairs)
    ref = _reference(rows, pairs)
    eager = TextDataset(texts=ref["texts"], text_pairs=ref["pairs"], labels=ref["labels"], ids=ref["ids"])
    rng = np.random.default_rng(0)
    for kind, src in _sources(rows, tmp_path).items():
        ds = as_text_dataset(src, id_column="uid")
        assert isinstance(ds, TextDataset if kind in ("rows", "jsonl") else ArrowTextDataset), kind
        assert len(ds) == 37 and np.array_equal(ds.ids, ref["ids"]) and np.array_equal(ds.labels, ref["labels"])
        assert ds.label_names == ref["names"], kind
        assert ds.fingerprint() == eager.fingerprint(), kind
        for a, b in [(0, 37), (3, 11), (4, 5), (20, 20), (9, 31)]:
            texts, prs = ds.text_range(a, b)
            assert texts == ref["texts"][a:b] and prs == (None if not pairs else ref["pairs"][a:b]), (kind, a, b)
        idx = rng.integers(0, 37, 9)
        texts, prs = ds.text_batch(idx)
        assert texts == [ref["texts"][i] for i in idx], kind
        assert prs == (None if not pairs else [ref["pairs"][i] for i in idx]), kind
        assert ds.texts[-1] == ref["texts"][-1] and ds.texts[1:30:7] == ref["texts"][1:30:7]
        assert list(ds.texts) == ref["texts"] and len(ds.texts) == 37
        sub = ds.subset(idx[::-1], "s")
        esub = eager.subset(idx[::-1])
        assert sub.fingerprint() == esub.fingerprint() and sub.text_range(0, 9) == esub.text_range(0, 9)
        assert sub.with_labels(np.zeros(9, dtype=int)).fingerprint() == esub.with_labels(np.zeros(9)).fingerprint()


def test_an_hf_selection_and_class_labels_match_the_rows_they_hold(tmp_path) -> None:
    rows = _rows(30, 5, False)
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["z", "a", "m"]),
                               "uid": datasets.Value("int64"), "other": datasets.Value("float64")})
    enc = [{**r, "label": ["z", "a", "m"].index({"neg": "z", "pos": "a", "mid": "m"}[r["label"]])} for r in rows]
    hf = datasets.Dataset.from_list(enc, features=feats)
    order = np.random.default_rng(1).permutation(30)[:17]
    ds = as_text_dataset(hf.select(order.tolist()))
    assert ds.label_names == ["z", "a", "m"]
    assert np.array_equal(ds.labels, [enc[i]["label"] for i in order])
    assert ds.text_range(0, 17)[0] == [rows[i]["text"] for i in order]
    assert np.array_equal(ds.ids, np.arange(17))


def test_column_choices_and_errors_match_the_eager_loader(tmp_path) -> None:
    rows = [{"a": f"x {i}", "b": f"y {i}", "y": str(i % 2), "k": i * 3} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=4)
    kw = dict(text_column="b", text_pair_column="a", label_column="y", id_column="k")
    eager, lazy = (load_dataset_spec(str(tmp_path / f"d.{s}"), **kw) for s in ("jsonl", "parquet"))
    assert isinstance(lazy, ArrowTextDataset) and eager.fingerprint() == lazy.fingerprint()
    assert lazy.text_batch([3, 0]) == (["y 3", "y 0"], ["x 3", "x 0"]) and lazy.ids.tolist() == [3 * i for i in range(12)]
    assert load_dataset_spec(str(tmp_path / "d.parquet"), limit=5, **kw).text_range(0, 5) == eager.subset(
        range(5)).text_range(0, 5)
    for bad in (dict(text_column="nope"), dict(label_column="zz"), {}, dict(text_column="a", id_column="a")):
        msgs = []
        for s in ("jsonl", "parquet"):
            with pytest.raises(DataError) as e:
                load_dataset_spec(str(tmp_path / f"d.{s}"), **bad)
            msgs.append(str(e.value).replace(f"d.{s}", "F"))
            assert "\n" not in msgs[-1]
        assert msgs[0] == msgs[1], bad


def test_bad_arrow_input_is_a_one_line_error(tmp_path) -> None:
    t = pa.table({"text": ["a", None, "c"], "label": [0, 1, 0]})
    with pytest.raises(DataError, match=r"text is missing \(null\) at row 1"):
        as_text_dataset(t)
    with pytest.raises(DataError, match="label.*missing"):
        as_text_dataset(pa.table({"text": ["a", "b"], "label": [0, None]}))
    with pytest.raises(DataError, match="no label column"):
        as_text_dataset(pa.table({"text": ["a", "b"]}))
    with pytest.raises(DataError, match="repeats ids"):
        as_text_dataset(pa.table({"text": ["a", "b"], "label": [0, 1], "i": [4, 4]}), id_column="i")
    (tmp_path / "x.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not a readable Arrow file"):
        as_text_dataset(str(tmp_path / "x.arrow"))
    with pytest.raises(DataError, match="DatasetDict"):
        as_text_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})}))


def test_extracted_features_are_identical_for_list_hf_table_and_parquet(tmp_path) -> None:
    from fastinf.extraction.extract import extract
    from tests._models import make_model
    from tests._tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    rows = [{"text": t, "label": int(i % 3)} for i, t in enumerate(random_texts(14, 9))]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    srcs = {"list": TextDataset(texts=[r["text"] for r in rows], labels=np.array([r["label"] for r in rows])),
            "hf": datasets.Dataset.from_list(rows), "table": table, "parquet": str(tmp_path / "d.parquet")}
    stores = {k: extract(make_model("bert"), tok, v, tmp_path / k, layers="attn.v,last", proj="4x4", dtype="fp32",
                         batch_size=4, chunk_size=6, max_length=16, progress=False) for k, v in srcs.items()}
    ref = stores.pop("list")
    for k, s in stores.items():
        assert s.unit_names == ref.unit_names
        for u in ref.unit_names:
            assert np.array_equal(np.asarray(s.features(u)), np.asarray(ref.features(u))), (k, u)
        for f in ("ids", "label", "loss", "logits"):
            assert np.array_equal(getattr(s.meta, f), getattr(ref.meta, f)), (k, f)
        assert s.identity["dataset"]["fingerprint"] == ref.identity["dataset"]["fingerprint"]
