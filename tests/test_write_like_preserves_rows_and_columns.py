"""``write_like`` writes the kept rows, in order, every column untouched, the extra columns appended — for each
format (Parquet, Arrow, jsonl, csv, tsv, json, save_to_disk, and from in-memory tables / HF datasets / rows),
compared with a literal filter of the input rows; it is atomic, never overwrites its input, refuses an existing
destination without ``overwrite``; ``results_table`` gives the ids and columns as Dataset / DataFrame / Parquet."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinf.data import results_table, write_like
from fastinf.errors import DataError
from tests._tokenizer import random_texts

datasets = pytest.importorskip("datasets")
N = 41


def _rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    texts = random_texts(N, seed)
    return [{"id": int(100 + 3 * i), "text": texts[i] + (", quoted" if i % 5 == 0 else ""),
             "label": int(rng.integers(0, 2)), "note": f"n{i}"} for i in range(N)]


def _read(path, fmt: str) -> list[dict]:
    """The rows of a written file, by a plain reader of that format (not fastinf's)."""
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "arrow":
        with pa.memory_map(str(path)) as f:
            return pa.ipc.open_file(f).read_all().to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if fmt == "json":
        return json.load(open(path, encoding="utf-8"))
    if fmt in ("csv", "tsv"):
        kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
        return list(csv.DictReader(open(path, encoding="utf-8", newline=""), **kw))
    return datasets.load_from_disk(str(path)).to_list()


def _write_source(rows: list[dict], tmp_path, fmt: str):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=6)
    elif fmt == "arrow":
        t = pa.Table.from_pylist(rows)
        with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)
    elif fmt == "jsonl":
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "")
                                                   for i, r in enumerate(rows)))
    elif fmt == "json":
        (tmp_path / "in.json").write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        with open(tmp_path / f"in.{fmt}", "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]), **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv"
                                                     else {}), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "in"))
        return str(tmp_path / "in")
    return str(tmp_path / f"in.{fmt}")


def _expected(rows, keep, extra, fmt):
    out = [{**r, **{k: v[i] for k, v in extra.items()}} for i, (r, k) in enumerate(zip(rows, keep)) if k]
    if fmt in ("csv", "tsv"):
        out = [{k: str(v) for k, v in r.items()} for r in out]
    return out


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl", "csv", "tsv", "json", "disk"])
def test_each_format_keeps_the_requested_rows_and_every_column(tmp_path, fmt) -> None:
    rows = _rows(1)
    src = _write_source(rows, tmp_path, fmt)
    rng = np.random.default_rng(2)
    keep = rng.random(N) > 0.3
    extra = {"score": np.round(rng.normal(size=N), 6), "flagged": ~keep}
    suffix = "" if fmt == "disk" else f".{fmt}"
    out = write_like(src, tmp_path / f"out{suffix}", keep=keep, extra_columns=extra)
    got = _read(out, fmt)
    want = _expected(rows, keep, {k: v.tolist() for k, v in extra.items()}, fmt)
    assert len(got) == keep.sum() and got == want
    plain = write_like(src, tmp_path / f"all{suffix}")
    assert _read(plain, fmt) == _expected(rows, np.ones(N, bool), {}, fmt)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_jsonl_keeps_kept_lines_byte_for_byte(tmp_path) -> None:
    lines = ['{"text": "caf\\u00e9", "label": 1, "x": 1.50}', '{"label": 0, "text": "b"}', '{"text": "c", "label": 1}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    write_like(str(tmp_path / "in.jsonl"), tmp_path / "o.jsonl", keep=np.array([True, False, True]))
    assert (tmp_path / "o.jsonl").read_text() == lines[0] + "\n" + lines[2] + "\n"


@pytest.mark.parametrize("kind", ["table", "hf", "hf-select", "rows", "lazy"])
@pytest.mark.parametrize("dest", ["out.parquet", "out.jsonl", "out.csv", "out"])
def test_in_memory_sources_write_any_format(tmp_path, kind, dest) -> None:
    from fastinf.data import as_text_dataset

    rows = _rows(3)
    order = np.random.default_rng(4).permutation(N)
    src = {"table": pa.Table.from_pylist(rows), "hf": datasets.Dataset.from_list(rows),
           "hf-select": datasets.Dataset.from_list([rows[i] for i in np.argsort(order)]).select(order.tolist()),
           "rows": rows, "lazy": as_text_dataset(pa.Table.from_pylist(rows))}[kind]
    keep = np.arange(N) % 4 != 1
    rank = np.arange(N)[::-1].copy()
    fmt = {"out": "disk"}.get(dest, dest.split(".")[-1])
    got = _read(write_like(src, tmp_path / dest, keep=keep, extra_columns={"rank": rank[keep]}), fmt)
    assert got == _expected(rows, keep, {"rank": rank.tolist()}, fmt)


def test_bad_requests_are_one_line_errors_and_leave_nothing(tmp_path) -> None:
    rows = _rows(5)
    src = _write_source(rows, tmp_path, "parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [(dict(dest=src, overwrite=True), "is the input itself"),
             (dict(dest=tmp_path / "o.xlsx"), "unknown output format"),
             (dict(dest=tmp_path / "o.parquet", keep=np.ones(N - 1, bool)), "keep has 40 entries"),
             (dict(dest=tmp_path / "o.parquet", keep=np.ones(N)), "boolean mask"),
             (dict(dest=tmp_path / "o.parquet", extra_columns={"note": np.zeros(N)}), "already exists"),
             (dict(dest=tmp_path / "o.parquet", extra_columns={"s": np.zeros(3)}), "has 3 values")]
    for kw, msg in cases:
        dest = kw.pop("dest")
        with pytest.raises(DataError, match=msg) as e:
            write_like(src, dest, **kw)
        assert "\n" not in str(e.value)
    (tmp_path / "in.txt.bad").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        write_like(str(tmp_path / "in.txt.bad"), tmp_path / "o.parquet")
    (tmp_path / "in.txt.bad").unlink()
    with pytest.raises(DataError, match="keep has 2 entries"):      # found while streaming: nothing is left
        write_like(_write_source(rows, tmp_path, "jsonl"), tmp_path / "o.jsonl", keep=np.ones(2, bool))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["in.jsonl"])


def test_an_existing_destination_needs_overwrite(tmp_path) -> None:
    rows = _rows(6)
    src = _write_source(rows, tmp_path, "parquet")
    (tmp_path / "o.parquet").write_bytes(b"old")
    with pytest.raises(DataError, match="exists; pass overwrite=True"):
        write_like(src, tmp_path / "o.parquet")
    assert (tmp_path / "o.parquet").read_bytes() == b"old"
    write_like(src, tmp_path / "o.parquet", overwrite=True)
    assert _read(tmp_path / "o.parquet", "parquet") == rows
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a save_to_disk dataset"):
        write_like(src, tmp_path / "folder", overwrite=True)
    write_like(src, tmp_path / "disk")
    write_like(src, tmp_path / "disk", keep=np.arange(N) < 5, overwrite=True)
    assert _read(tmp_path / "disk", "disk") == rows[:5] and (tmp_path / "folder" / "mine.txt").exists()


def test_results_table_as_dataset_frame_and_parquet(tmp_path) -> None:
    ids = np.array([7, 3, 11])
    cols = {"score": np.array([0.5, -1.0, 2.0]), "flagged": [True, False, True]}
    want = [{"id": 7, "score": 0.5, "flagged": True}, {"id": 3, "score": -1.0, "flagged": False},
            {"id": 11, "score": 2.0, "flagged": True}]
    assert results_table(ids, cols, as_="datasets").to_list() == want
    assert results_table(ids, cols, as_="pandas").to_dict("records") == want
    path = results_table(ids, cols, as_="parquet", path=tmp_path / "r.parquet")
    assert pq.read_table(path).to_pylist() == want
    with pytest.raises(DataError, match="exists"):
        results_table(ids, cols, as_="parquet", path=path)
    with pytest.raises(DataError, match="has 2 values for 3 ids"):
        results_table(ids, {"s": [1, 2]})
    with pytest.raises(DataError, match="as_ must be"):
        results_table(ids, cols, as_="excel")
