"""curate's private write-back fallback (used for an API ``TextDataset``, or a data layer without
``write_like``) writes the same rows and columns as ``fastinf.data.write_like`` for every file format, on
fresh random masks and extra columns; and both leave nothing behind on a bad mask."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.errors import DataError
from tests.test_curate_writes_each_input_format_back_without_the_lowest import columns, read_back, write_source


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "hf_disk"])
def test_fallback_writes_what_the_data_layer_writes(kind, tmp_path) -> None:
    import fastinf.data as data
    from fastinf.curation._write_back import write_like as fallback

    src = write_source(kind, tmp_path, columns(30))
    rng = np.random.default_rng(4)
    keep = rng.random(30) < 0.7
    extra = {"fastinf_score": rng.normal(size=30).round(6), "fastinf_flagged": rng.random(30) < 0.2}
    suffix = "" if kind == "hf_disk" else src.suffix
    for name, fn in (("a", fallback), ("b", data.write_like)):
        fn(str(src), tmp_path / f"{name}{suffix}", keep=keep, extra_columns=extra)
    a, b = read_back(kind, tmp_path / f"a{suffix}"), read_back(kind, tmp_path / f"b{suffix}")
    assert list(a) == list(b) and len(a["uid"]) == int(keep.sum())
    for col in a:
        va, vb = a[col], b[col]
        if col == "fastinf_score":
            np.testing.assert_allclose(np.asarray(va, float), np.asarray(vb, float), rtol=1e-6)
        elif col == "fastinf_flagged":
            assert [str(x).lower() in ("true", "1") for x in va] == [str(x).lower() in ("true", "1") for x in vb]
        else:
            assert [str(x) for x in va] == [str(x) for x in vb], col


def test_fallback_refuses_a_bad_mask_and_writes_nothing(tmp_path) -> None:
    from fastinf.curation._write_back import write_like as fallback

    src = write_source("jsonl", tmp_path, columns(10))
    with pytest.raises(DataError, match="mask over the 10 rows"):
        fallback(str(src), tmp_path / "out.jsonl", keep=np.ones(9, bool))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
