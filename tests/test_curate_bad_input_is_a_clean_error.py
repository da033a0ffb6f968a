"""Bad input to `fastinf curate` is a one-line fastinf error before any work, and leaves nothing behind:
missing or unreadable data, a bad reference choice, bad percentages or options, a missing model, and an
existing output directory fastinf did not create (refused, its files untouched, with or without
--overwrite)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinf.errors import ConfigError, DataError, FastinfError


@pytest.fixture()
def src(tmp_path) -> str:
    pq.write_table(pa.table({"text": [f"w{i} w{i + 1}" for i in range(20)], "label": np.arange(20) % 2}),
                   tmp_path / "train.parquet")
    return str(tmp_path / "train.parquet")


CASES = [
    ({"train": "missing.parquet"}, DataError, "not found"),
    ({"reference_fraction": None}, ConfigError, "exactly one reference"),
    ({"reference_rows": 3}, ConfigError, "exactly one reference"),
    ({"reference_fraction": 1.5}, ConfigError, "fraction in (0, 1)"),
    ({"reference_fraction": None, "reference_rows": 20}, ConfigError, "leaves no reference or no train"),
    ({"drop_lowest": 0}, ConfigError, "percentage in (0, 100)"),
    ({"flag_lowest": 100}, ConfigError, "percentage in (0, 100)"),
    ({"method": "selfinf"}, ConfigError, "curate supports"),
    ({"how": "median"}, ConfigError, "curate supports"),
    ({"top": 0}, ConfigError, "positive number"),
    ({"model": "no/such/model_dir"}, ConfigError, "no such directory"),
    ({"recommendation": "no_such_run"}, ConfigError, "no layer recommendation"),
]


@pytest.mark.parametrize("change, error, words", CASES, ids=[c[2].split()[0] + str(i) for i, c in enumerate(CASES)])
def test_bad_argument_is_one_line_and_writes_nothing(change, error, words, src, tmp_path, monkeypatch) -> None:
    from fastinf.curation.curate import curate

    monkeypatch.chdir(tmp_path)
    kw = {"train": src, "model": "no_model_needed", "out": tmp_path / "out", "reference_fraction": 0.2}
    kw.update(change)
    with pytest.raises(error) as e:
        curate(kw.pop("train"), kw.pop("model"), **kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_directory_fastinf_did_not_create_is_refused(src, tmp_path, overwrite) -> None:
    from fastinf.curation.curate import curate

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError) as e:
        curate(src, "m", out=out, reference_fraction=0.2, overwrite=overwrite)
    assert "\n" not in str(e.value) and "notes.txt" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        curate(src, "m", out=tmp_path / "file", reference_fraction=0.2)


def test_cli_reports_bad_input_on_one_line(src, tmp_path, capsys) -> None:
    from fastinf.cli import main

    rc = main(["curate", "--train", str(tmp_path / "nope.csv"), "--model", "m", "--reference-fraction", "0.2",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fastinf curate: error:") and "\n" not in err and "not found" in err
    rc = main(["curate", "--train", src, "--model", "m", "--reference-rows", "4", "--drop-lowest", "-3",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--drop-lowest" in err or "drop_lowest" in err
    assert not (tmp_path / "o").exists()
    assert issubclass(DataError, FastinfError)


def test_reference_labels_are_aligned_to_the_train_classes_or_refused(tmp_path) -> None:
    from fastinf.curation.inputs import load_source, split_reference

    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "label": ["ham", "spam", "ham", "spam"]}),
                   tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["e", "f"], "label": ["spam", "spam"]}), tmp_path / "ref.parquet")
    pq.write_table(pa.table({"text": ["g"], "label": ["eggs"]}), tmp_path / "bad.parquet")
    full = load_source(str(tmp_path / "train.parquet"))
    data = split_reference(None, full, str(tmp_path / "ref.parquet"))
    assert data.reference.labels.tolist() == [1, 1] and list(data.reference.label_names) == ["ham", "spam"]
    with pytest.raises(DataError, match="not a class of the reference set"):
        split_reference(None, full, str(tmp_path / "bad.parquet"))
