"""A damaged score set is never silently used: a flipped byte, a changed ``.npy`` header, a truncated or
deleted file, or a garbage manifest is detected and named (which file) before the scores reach
aggregate / ndr; ``ScoreSet.verify()`` lists every problem; an old format-1 set opens with a warning."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fastinf.aggregation.aggregate import aggregate
from fastinf.cli.app import main
from fastinf.errors import CorruptStoreError, StoreError
from fastinf.scoring.dist_score import score_distributed
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore

RNG = np.random.default_rng(0)
ARR = RNG.standard_normal((2, 5, 9)).astype(np.float32)


def _set(tmp_path, name="s"):
    return ScoreSet.from_arrays(ARR, unit_names=["a", "b"], test_correct=[True] * 5, path=tmp_path / name)


def _flip(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["units/0.npy", "units/1.npy", "train_ids.npy", "test_ids.npy", "test_correct.npy"])
def test_a_flipped_byte_in_any_data_file_is_named(tmp_path, rel):
    s = _set(tmp_path)
    _flip(s.path / rel)
    fresh = ScoreSet.open(s.path)                      # opening reads headers only
    problems = fresh.verify()
    assert len(problems) == 1 and rel in problems[0] and "checksum" in problems[0]
    with pytest.raises(CorruptStoreError, match=rel.replace(".", r"\.")):
        if rel.endswith("_ids.npy"):     # ids are read by the exports
            ScoreSet.open(s.path).to_parquet(tmp_path / "top.parquet", k=2)
        else:
            aggregate(ScoreSet.open(s.path), how="mean", correct_only=rel == "test_correct.npy")


def test_a_corrupt_set_is_refused_by_the_aggregate_cli(tmp_path, capsys):
    s = _set(tmp_path)
    _flip(s.path / "units/1.npy")
    rc = main(["aggregate", str(s.path), "--how", "rank", "--out", str(tmp_path / "agg.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "units/1.npy fails its SHA-256 checksum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "agg.parquet").exists()


def test_a_header_dtype_change_of_the_same_item_size_is_named(tmp_path):
    s = _set(tmp_path)
    p = s.path / "units/0.npy"
    p.write_bytes(p.read_bytes().replace(b"'<f4'", b"'<i4'", 1))
    with pytest.raises(StoreError, match=r"units/0\.npy.*int32"):
        ScoreSet.open(s.path)


@pytest.mark.parametrize("damage", ["truncate_unit", "truncate_header", "delete_train_ids", "truncate_manifest",
                                    "garbage_manifest", "list_manifest", "manifest_without_files",
                                    "binary_manifest"])
def test_damaged_files_give_a_clean_error_naming_them(tmp_path, damage):
    s = _set(tmp_path)
    m = s.path / "manifest.json"
    text = m.read_text()
    if damage == "truncate_unit":
        (s.path / "units/1.npy").write_bytes((s.path / "units/1.npy").read_bytes()[:-8])
        want = r"units/1\.npy"
    elif damage == "truncate_header":
        (s.path / "units/0.npy").write_bytes((s.path / "units/0.npy").read_bytes()[:20])
        want = r"units/0\.npy.*truncated"
    elif damage == "delete_train_ids":
        (s.path / "train_ids.npy").unlink()
        want = r"train_ids\.npy.*missing"
    elif damage == "truncate_manifest":
        m.write_text(text[: len(text) // 2])
        want = "manifest.json is unreadable or truncated"
    elif damage == "garbage_manifest":
        m.write_text("not json at all")
        want = "manifest.json is unreadable"
    elif damage == "binary_manifest":
        m.write_bytes(b"\xff\xfe\x00garbage")
        want = "manifest.json is unreadable"
    elif damage == "list_manifest":
        m.write_text("[1, 2, 3]")
        want = "holds a JSON list, not a score-set manifest"
    else:
        d = json.loads(text)
        del d["files"]
        m.write_text(json.dumps(d))
        want = r"lacks the field\(s\) \['files'\]"
    with pytest.raises(StoreError, match=want):
        ScoreSet.open(s.path)


def test_a_manifest_stripped_of_its_checksums_is_not_trusted(tmp_path):
    s = _set(tmp_path)
    d = json.loads((s.path / "manifest.json").read_text())
    del d["checksums"]
    (s.path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CorruptStoreError, match=r"units/0\.npy has no checksum"):
        ScoreSet.open(s.path).unit_scores("a")


def test_a_format_1_set_without_checksums_opens_with_a_warning(tmp_path, caplog):
    s = _set(tmp_path)
    d = json.loads((s.path / "manifest.json").read_text())
    for k in ("checksums", "format"):
        del d[k]
    d["format_version"] = 1
    (s.path / "manifest.json").write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        old = ScoreSet.open(s.path)
    assert "format 1 (no checksums)" in caplog.text
    np.testing.assert_array_equal(old.unit_scores("b"), ARR[1])
    assert old.verify() == []


def test_distributed_score_sets_carry_checksums_too(tmp_path):
    rng = np.random.default_rng(1)
    train = GradientStore.from_arrays(tmp_path / "tr", {"a": rng.standard_normal((10, 4)).astype(np.float32)})
    test = GradientStore.from_arrays(tmp_path / "te", {"a": rng.standard_normal((3, 4)).astype(np.float32)})
    s = score_distributed(test, train, "graddot", out=tmp_path / "d", block_size=4)
    assert s.verify() == [] and set(s.manifest["checksums"]) >= {"units/0.npy", "train_ids.npy"}
    _flip(s.path / "units/0.npy")
    with pytest.raises(CorruptStoreError, match=r"units/0\.npy"):
        ScoreSet.open(s.path).unit_scores("a")


def test_save_refuses_to_copy_a_corrupt_set(tmp_path):
    s = _set(tmp_path)
    _flip(s.path / "units/0.npy")
    with pytest.raises(CorruptStoreError, match=r"units/0\.npy"):
        ScoreSet.open(s.path).save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
