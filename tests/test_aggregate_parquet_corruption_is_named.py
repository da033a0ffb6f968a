"""A damaged aggregate Parquet (truncated, not Parquet, a flipped byte, edited scores) or a damaged noise
mask archive is named by `fastinf ndr` / `read_parquet` — never silently read as other scores."""
from __future__ import annotations

import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinf.aggregation.aggregate import aggregate_all
from fastinf.aggregation.evaluate import load_noise_mask
from fastinf.aggregation.parquet import read_parquet, write_parquet
from fastinf.cli.app import main
from fastinf.data.noise import inject_noise
from fastinf.errors import ConfigError

N = 64


@pytest.fixture
def agg(tmp_path):
    rng = np.random.default_rng(3)
    res = aggregate_all(rng.standard_normal((2, 4, N)).astype(np.float32), "mean,rank")
    path = tmp_path / "agg.parquet"
    write_parquet(res, path)
    inject_noise(np.arange(N) % 2, 0.25, seed=0).save(tmp_path / "noise.npz")
    return path, res


def _ndr_fails(capsys, path, mask, needle):
    rc = main(["ndr", str(path), "--noise-mask", str(mask)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path.name) in err and needle in err, err


def test_intact_file_reads_back_exactly(agg):
    path, res = agg
    back = read_parquet(path)
    for (g, h), s in res.scores.items():
        np.testing.assert_array_equal(back[f"{g}/{h}"], s)


@pytest.mark.parametrize("cut", [1, 9, 100, 0.5])
def test_truncated_parquet_is_named(agg, capsys, cut):
    path, _ = agg
    raw = path.read_bytes()
    n = int(len(raw) * cut) if isinstance(cut, float) else len(raw) - cut
    path.write_bytes(raw[:n])
    with pytest.raises(ConfigError, match="agg.parquet"):
        read_parquet(path)
    _ndr_fails(capsys, path, path.parent / "noise.npz", "Parquet")


def test_a_file_that_is_not_parquet_is_named(tmp_path, capsys, agg):
    bad = tmp_path / "notes.parquet"
    bad.write_text("score\n1.0\n")
    _ndr_fails(capsys, bad, agg[0].parent / "noise.npz", "not a readable Parquet")


def test_every_flipped_byte_of_the_data_is_named_or_harmless(agg):
    """Flip each byte of the file in turn: reading either fails with a ConfigError naming the file or gives
    exactly the written scores (bytes that carry no data, e.g. statistics) — never other scores."""
    path, res = agg
    raw = path.read_bytes()
    want = {f"{g}/{h}": s for (g, h), s in res.scores.items()}
    named = 0
    for i in range(0, len(raw), max(1, len(raw) // 500)):
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x5A]) + raw[i + 1:])
        try:
            got = read_parquet(path)
        except ConfigError as e:
            assert "agg.parquet" in str(e)
            named += 1
            continue
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), f"byte {i}"
    assert named > 0


def test_edited_scores_with_the_old_metadata_are_named(agg, capsys):
    path, _ = agg
    table = pq.read_table(path)
    scores = table.column("score").to_numpy().copy()
    scores[5] += 1.0
    edited = table.set_column(table.column_names.index("score"), "score", pa.array(scores))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ConfigError, match="checksum"):
        read_parquet(path)
    _ndr_fails(capsys, path, path.parent / "noise.npz", "checksum")


def test_damaged_noise_archive_is_named(agg, capsys):
    path, _ = agg
    noise = path.parent / "noise.npz"
    with zipfile.ZipFile(noise) as z:
        info = z.getinfo("mask.npy")
    raw = bytearray(noise.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + info.compress_size - 3] ^= 0xFF   # a byte of the mask data
    noise.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="noise.npz.*damaged"):
        load_noise_mask(noise, N)
    rc = main(["ndr", str(path), "--noise-mask", str(noise)])
    err = capsys.readouterr().err
    assert rc == 2 and "noise.npz" in err and "Traceback" not in err
