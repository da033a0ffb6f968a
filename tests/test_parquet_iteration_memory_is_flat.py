"""Opening a Parquet file and reading it batch by batch (as extraction does: a chunk's range, then index
batches, plus the streamed fingerprint) keeps memory flat: the peak RSS growth for 300k rows stays within a few
MB of the growth for 30k rows (only labels and ids, 16 bytes a row, grow with N; texts never become one list)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import gc, json, sys
    import numpy as np, psutil, pyarrow, pyarrow.parquet
    from fastinf.data import as_text_dataset
    proc = psutil.Process()
    warm = as_text_dataset(sys.argv[1])       # pay the lazy imports and first-use allocations before the baseline,
    warm.text_range(0, min(len(warm), 512))   # so growth counts what the rows cost, not import noise (~15 MB)
    del warm
    gc.collect()
    base = peak = proc.memory_info().rss
    ds = as_text_dataset(sys.argv[1])
    n, seen = len(ds), 0
    for a in range(0, n, 4096):
        b = min(a + 4096, n)
        texts, _ = ds.text_range(a, b)
        rows = a + np.argsort([len(t) for t in texts], kind="stable")
        for s in range(0, b - a, 512):
            seen += len(ds.text_batch(rows[s:s + 512])[0])
        peak = max(peak, proc.memory_info().rss)
    fp = ds.fingerprint()
    peak = max(peak, proc.memory_info().rss)
    print(json.dumps({"n": n, "seen": seen, "growth_mb": (peak - base) / 2**20, "fp": fp}))
""")


def _write(path: Path, n: int, group: int = 10_000) -> None:
    schema = pa.schema([("text", pa.string()), ("label", pa.int64()), ("note", pa.string())])
    with pq.ParquetWriter(str(path), schema) as w:
        for a in range(0, n, group):
            i = np.arange(a, min(a + group, n))
            texts = [f"sample {k} says {'lorem ' * int(k % 7)}ok" for k in i.tolist()]
            w.write_table(pa.table({"text": texts, "label": i % 3, "note": [str(k) for k in i.tolist()]},
                                   schema=schema), row_group_size=group)


def _growth(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_rows(tmp_path) -> None:
    _write(tmp_path / "small.parquet", 30_000)
    _write(tmp_path / "big.parquet", 300_000)
    small, big = _growth(tmp_path / "small.parquet"), _growth(tmp_path / "big.parquet")
    assert small["seen"] == 30_000 and big["seen"] == 300_000
    # 270k more rows: 4.3 MB of labels + ids (+ the label column in Arrow while labels are mapped)
    assert big["growth_mb"] < small["growth_mb"] + 16, (small, big)
