"""A bad data file is one ``DataError`` line naming the file (and the line where there is one) — never a
traceback — and a typo'd local path is "file not found", never a Hub lookup. Through the CLI: exit 2, one
line on stderr, nothing written under ``--out``.
"""
from __future__ import annotations

import json

import pytest

from fastinf.data.datasets import load_dataset_spec
from fastinf.data.files import looks_like_path
from fastinf.errors import DataError


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Any attempt to reach the Hub fails the test."""
    import datasets

    def refuse(*a, **k):
        raise AssertionError(f"went to the Hub with {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# (file name, bytes, what the message must say)
BAD_FILES = [
    ("latin1.jsonl", '{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"), r"latin1\.jsonl:1: not UTF-8"),
    ("latin1.csv", "text,label\nok,0\ncaf\xe9,1\n".encode("latin-1"), r"latin1\.csv:3: not UTF-8"),
    ("latin1.tsv", "text\tlabel\ncaf\xe9\t1\n".encode("latin-1"), r"latin1\.tsv:2: not UTF-8"),
    ("broken.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": \n', r"broken\.jsonl:2: not valid JSON"),
    ("scalar_line.jsonl", b'{"text": "a", "label": 0}\n7\n', r"scalar_line\.jsonl:2: .*not a JSON object"),
    ("scalars.json", b"[1, 2, 3]", r"scalars\.json: item 1 is a int, not an object"),
    ("string.json", b'"hello"', r"string\.json: .*not a str"),
    ("badcol.json", b'{"text": "a", "label": [0]}', r"badcol\.json: column 'text' is a str"),
    ("broken.json", b'{"text": ["a"], ', r"broken\.json:1: not valid JSON"),
    ("fake.parquet", b"text,label\na,0\n", r"fake\.parquet: not a readable Parquet file"),
    ("empty.csv", b"", r"empty\.csv is empty"),
    ("dup.csv", b"text,label,label\na,0,1\n", r"dup\.csv:1: column 'label' appears more than once"),
    ("ragged.csv", b"text,label\na,0\nb,1,2\n", r"ragged\.csv:3: 3 fields, header has 2"),
    ("nul.csv", b"text,label\n\"a\x00b,0\n", r"nul\.csv"),
]


@pytest.mark.parametrize("name,data,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_data_file_is_one_clean_error(tmp_path, name, data, message) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        load_dataset_spec(str(tmp_path / name))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["nope.jsonl", "data/train.csv", "./train", "~/missing.tsv", "a/b/c",
                                  "dir/", "owner/name.json"])
def test_a_typod_local_path_is_file_not_found(tmp_path, monkeypatch, spec) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_dataset_spec(spec)


def test_file_not_found_suggests_near_names(tmp_path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"did you mean .*train\.jsonl"):
        load_dataset_spec(str(tmp_path / "trian.jsonl"))


@pytest.mark.parametrize("spec,path_like", [("imdb", False), ("stanfordnlp/imdb", False), ("glue:sst2", False),
                                            ("cnn_dailymail:3.0.0", False), ("nope.jsonl", True),
                                            ("data/x.csv", True), ("/abs/dir", True), ("a/b/c", True),
                                            ("../up", True), ("~/x", True)])
def test_only_hub_shaped_names_go_to_the_hub(spec, path_like) -> None:
    assert looks_like_path(spec) is path_like


def test_a_hub_shaped_name_still_reaches_the_hub(tmp_path, monkeypatch) -> None:
    import datasets

    seen = []

    def fake(name, config=None, split=None):
        seen.append((name, config, split))
        return {"text": ["a", "b"], "label": [0, 1]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset_spec("owner/name", split="train")) == 2
    assert len(load_dataset_spec("glue:sst2", split="validation")) == 2
    assert seen == [("owner/name", None, "train"), ("glue", "sst2", "validation")]


def test_a_bad_limit_is_refused_before_loading(tmp_path) -> None:
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_dataset_spec(str(tmp_path / "never-read.jsonl"), limit=0)


@pytest.mark.parametrize("name,data", [("nope.jsonl", None), ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1")),
                                       ("broken.jsonl", b'{"text": \n'), ("fake.parquet", b"PAR")])
def test_cli_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, name, data) -> None:
    from fastinf.cli import main

    if data is not None:
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "store"
    rc = main(["extract", "--model", "minilm-not-needed", "--data", str(tmp_path / name), "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fastinf extract: error: ") and len(err.splitlines()) == 1, err
    assert name in err and "Traceback" not in err
    assert not out.exists()


def test_good_files_still_load(tmp_path) -> None:
    rows = [{"text": "a", "label": "ham"}, {"text": "b", "label": "spam"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_bytes("\ufefftext,label\n\"x, y\",1\nz,0\n".encode("utf-8"))
    for f in ("d.jsonl", "d.json"):
        ds = load_dataset_spec(str(tmp_path / f))
        assert ds.texts == ["a", "b"] and ds.labels.tolist() == [0, 1] and ds.label_names == ["ham", "spam"]
    ds = load_dataset_spec(str(tmp_path / "d.csv"))
    assert ds.texts == ["x, y", "z"] and ds.labels.tolist() == [1, 0]
