"""Score-while-extracting against store-then-score (a script, not a test): MiniLM on SMS, exact features.

Each path runs in a fresh process (peak RSS = that process's VmHWM), in the same run, on the same rows:

* ``two_stage`` - ``extract`` the test store, ``extract`` the train store (fp16, exact), ``score``.
* ``stream``    - ``extract`` the test store, ``score_while_extracting`` (no train store).

Both write the same per-unit score set (checked: max relative difference printed). Defaults follow the
issue-17 workload (N = 512 train x M = 64 test, max_length 32, every nn.Linear + head, exact); pass small
``--n/--m/--layers`` to check that the script works. Writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys, tempfile, time
sys.path.insert(0, {root!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, torch
torch.set_num_threads({threads})
from bench.extract import load, sms_rows
from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
from fastinf.scoring.estimators import score
from fastinf.scoring.extract_score import score_while_extracting
model, tok = load()
texts, labels = sms_rows()
n, m, T = {n}, {m}, {T}
train = TextDataset(texts=texts[:n], labels=labels[:n], name="sms-train")
test_ds = TextDataset(texts=texts[n:n + m], labels=labels[n:n + m], name="sms-test")
kw = dict(layers={layers!r}, proj="exact", max_length=T, progress=False)
d = tempfile.mkdtemp(dir={tmp!r})
t0 = time.perf_counter()
test = extract(model, tok, test_ds, os.path.join(d, "test"), **kw)
if {mode!r} == "two_stage":
    tr = extract(model, tok, train, os.path.join(d, "train"), **kw)
    s = score(test, tr, "graddot", out={scores!r})
else:
    s = score_while_extracting(model, tok, train, test, "graddot", out={scores!r}, max_length=T)
wall = time.perf_counter() - t0
written = sum(p.stat().st_size for p in __import__("pathlib").Path(d).rglob("*") if p.is_file())
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"wall_s": wall, "peak_rss_mb": hwm / 1024, "bytes_written_besides_scores": written}}))
"""


def run(mode: str, args: argparse.Namespace, scores: Path) -> dict:
    code = _CHILD.format(root=str(ROOT), threads=args.threads, n=args.n, m=args.m, T=args.max_length,
                         layers=args.layers, tmp=args.tmp, mode=mode, scores=str(scores))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{mode:9s}: {out['wall_s']:.1f}s, peak RSS {out['peak_rss_mb']:.0f} MiB, "
          f"{out['bytes_written_besides_scores'] / 2**20:.0f} MiB written besides the scores", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--layers", default="linear,head")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tmp", default=None, help="where the stores go (default: $TMPDIR)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "score_while_extracting.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        rows = {mode: run(mode, args, Path(d) / mode) for mode in ("two_stage", "stream")}
        from fastinf.scoring.scores import ScoreSet

        a, b = ScoreSet.open(Path(d) / "two_stage"), ScoreSet.open(Path(d) / "stream")
        err = max(float(np.abs(a.unit_scores(u) - b.unit_scores(u)).max() /
                        max(np.abs(a.unit_scores(u)).max(), 1e-30)) for u in a.unit_names)
    result = {"benchmark": "score_while_extracting", "n": args.n, "m": args.m, "max_length": args.max_length,
              "layers": args.layers, "proj": "exact", "threads": args.threads, **rows,
              "speedup_two_stage_over_stream": round(rows["two_stage"]["wall_s"] / rows["stream"]["wall_s"], 3),
              "max_rel_diff": err, "loadavg": os.getloadavg()}
    print(f"speedup {result['speedup_two_stage_over_stream']}x, max rel. diff of the scores {err:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
