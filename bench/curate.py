"""Benchmark: ``fastinf curate`` end to end on a GENERATED Parquet of short texts (default 100k and 1M rows).

The data is synthetic and generated here: each row is 4-10 words drawn from a 40-word vocabulary, labelled
by which of two sentiment word sets it draws from, with 5% of the labels flipped (so there is something
to find), written as one Parquet file (columns ``uid``, ``text``, ``label``) in batches. The model is a
tiny random BERT (2 blocks, hidden 16, a word-level vocabulary) saved to a directory; nothing is
downloaded. Each size runs ``fastinf.curate`` in a child process (``--reference-rows`` held out, layer
group ``--layers``, ``--method``, ``--how``, ``--drop-lowest``) and records:

* peak RSS (VmHWM of the child; the target is a flat curve, <= 4 GB at 1M rows),
* wall time, rows/s (scored rows per wall second) and the per-stage seconds (extract, influence, write),
* bytes written: the child's ``wchar`` and the size of the curate directory (stores, tables, report,
  cleaned Parquet),
* the load average before and after (the machine may be shared: compare rows only from a quiet run).

Writes bench/results/curate.json (``--out``)::

    python bench/curate.py                        # 100k and 1M rows (minutes; run on a quiet machine)
    python bench/curate.py --rows 20000           # a quick check that it works
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POS, NEG = ["good", "great", "fine", "nice", "love"], ["bad", "awful", "poor", "sad", "hate"]
FILLER = [f"w{i}" for i in range(30)]
NOISE = 0.05


def make_model(path: Path) -> str:
    """A tiny random BERT classifier (2 classes) with a word-level tokenizer, saved as an HF directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILLER
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def make_parquet(path: Path, n: int, seed: int = 0, batch: int = 100_000) -> int:
    """Write ``n`` generated rows to ``path`` in batches (memory independent of n); returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(FILLER + POS + NEG)
    schema = pa.schema([("uid", pa.string()), ("text", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for a in range(0, n, batch):
            b = min(n, a + batch)
            y = rng.integers(0, 2, b - a)
            lens = rng.integers(4, 11, b - a)
            idx = rng.integers(0, len(FILLER), (b - a, 10))
            idx[:, 0] = len(FILLER) + rng.integers(0, 5, b - a) + 5 * (1 - y)   # one sentiment word
            texts = [" ".join(words[r[:k]]) for r, k in zip(idx, lens)]
            flip = rng.random(b - a) < NOISE
            w.write_table(pa.table({"uid": [f"r{i}" for i in range(a, b)], "text": texts,
                                    "label": np.where(flip, 1 - y, y)}, schema=schema))
    return path.stat().st_size


def _io_wchar() -> int:
    try:
        rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(rows["wchar"])
    except (OSError, KeyError, ValueError):
        return -1


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def child(a: argparse.Namespace) -> None:
    """One curate run (in its own process, so that its peak RSS is its own)."""
    import torch

    from fastinf.curation.curate import curate

    if a.threads:
        torch.set_num_threads(a.threads)
    w0, t0 = _io_wchar(), time.perf_counter()
    res = curate(a.data, a.model, out=a.work, reference_rows=a.reference_rows, layers=a.layers, method=a.method,
                 how=a.how, drop_lowest=a.drop_lowest, max_length=16, seed=0, batch_size=a.batch_size or None)
    wall = time.perf_counter() - t0
    stages = {}
    for f in Path(a.work).glob("*.done.json"):
        stages[f.name[:-len(".done.json")]] = json.loads(f.read_text())["seconds"]
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_bytes": _peak_rss(), "wchar": _io_wchar() - w0,
                                  "scored": int(len(res.ranking.rows)), "stages_s": stages}))


def run_size(n: int, tmp: Path, model: str, a: argparse.Namespace) -> dict:
    """Generate ``n`` rows, curate them in a child, and collect the figures."""
    data = tmp / f"rows{n}.parquet"
    print(f"generating {n} synthetic rows (short texts, {NOISE:.0%} flipped labels) into {data.name}", flush=True)
    t0 = time.perf_counter()
    data_bytes = make_parquet(data, n)
    gen_s = time.perf_counter() - t0
    work = tmp / f"cur{n}"
    load0 = os.getloadavg()
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--model", model, "--work", str(work),
           "--reference-rows", str(a.reference_rows), "--layers", a.layers, "--method", a.method, "--how", a.how,
           "--drop-lowest", str(a.drop_lowest), "--threads", str(a.threads or 0),
           "--batch-size", str(a.batch_size or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"curate child failed at {n} rows:\n{proc.stderr[-3000:]}")
    row = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    out_bytes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    row.update(rows=n, generated_data=True, data_bytes=data_bytes, generate_s=gen_s, out_dir_bytes=out_bytes,
               rows_per_s=row["scored"] / row["wall_s"], loadavg_before=load0, loadavg_after=os.getloadavg())
    shutil.rmtree(work, ignore_errors=True)
    data.unlink()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", default="100000,1000000", help="comma-separated sizes (generated rows)")
    p.add_argument("--reference-rows", type=int, default=256)
    p.add_argument("--layers", default="last")
    p.add_argument("--method", default="graddot")
    p.add_argument("--how", default="rank")
    p.add_argument("--drop-lowest", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="extraction batch (default: fastinf's plan)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "curate.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    sizes = [int(s) for s in a.rows.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="fastinf_bench_curate_") as td:
        tmp = Path(td)
        model = make_model(tmp / "model")
        rows = []
        for n in sizes:
            rows.append(run_size(n, tmp, model, a))
            r = rows[-1]
            print(f"{n:>9} rows: {r['wall_s']:8.1f} s  {r['rows_per_s']:8.0f} rows/s  peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:5.2f} GiB  wrote {r['out_dir_bytes'] / 2**20:8.1f} MiB  "
                  f"load {r['loadavg_before'][0]:.1f}", flush=True)
    result = {"bench": "curate", "note": "the input Parquet is GENERATED by bench/curate.py (synthetic short texts, "
              "5% flipped labels); tiny random BERT", "settings": {k: v for k, v in vars(a).items()
                                                                   if k not in ("child", "data", "model", "work")},
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "git": _git_sha(), "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
