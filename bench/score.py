"""Benchmark: blocked store scoring (``fastinf.score``) against plain ``torch.matmul``, DataInf's linear
form against the literal O(N²) formula, and peak memory of a large multi-unit scoring run.

Synthetic fp16 stores (``GradientStore.from_arrays``) in a temporary directory under /tmp (deleted after):

1. Throughput: ``score(test, train, "graddot")`` with M = 1,000 test rows, k = 256, N train rows
   (default 100k and 1M), end to end — store reads (fp16 -> fp32), checksum checks, one fp32 GEMM per
   block, score blocks written to disk — in GFLOP/s (2·M·N·k flops), as a ratio to a plain
   ``torch.matmul`` of the same shapes on in-memory fp32 data (the same [M, k] x [k, b] blocks, output
   discarded), measured just before and just after in the same run (their mean is the baseline).
   ``if`` (exact, k = 256) is timed at the smallest N too: first call (fits H: one float64 pass over
   the store, saved under precond/), then again with the saved H reused.
2. DataInf at N = 20k: fastinf's linear form (one pass to fit the k×k preconditioner, one GEMM) against
   the paper's literal formula through the N×N train Gram (blocked, fp32 torch, same threads), and the
   largest relative difference between the two.
   At the largest N the graddot run is repeated with the score set on /dev/shm: 4 GB of scores on a
   ~200 MB/s virtual disk is bounded by the disk, not by the scoring pipeline.
3. Memory: N = 200k × M = 1k for 8 units (k = 256), run in a child process; its peak RSS (ru_maxrss)
   must stay below 2 GB. (The score set itself is 8 × 800 MB on disk.)

Writes bench/results/score.json and prints a table. The machine is shared with other engineers' jobs:
the load average is recorded; compare ratios, which are measured in the same run.

    python bench/score.py              # the issue's sizes (a few minutes on 2 cores)
    python bench/score.py --quick      # small sizes, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastinf.scoring.estimators import score
from fastinf.store import GradientStore

ROOT = Path(__file__).resolve().parents[1]
M, K = 1000, 256


def synthetic_store(path: Path, n: int, k: int, units: int = 1, seed: int = 0) -> GradientStore:
    """fp16 store with ``units`` units sharing one random [n, k] array (generated in fp16 chunks)."""
    rng = np.random.default_rng(seed)
    feats = np.empty((n, k), np.float16)
    for s in range(0, n, 1 << 16):
        feats[s:s + (1 << 16)] = rng.standard_normal((min(1 << 16, n - s), k), dtype=np.float32)
    return GradientStore.from_arrays(path, {f"u{i}": feats for i in range(units)}, dtype="float16",
                                     chunk_size=1 << 16)


def matmul_baseline(n: int, k: int, block: int) -> tuple[float, float]:
    """(wall s, process CPU s) of a plain fp32 ``torch.matmul`` of [M, k] x [k, n], done in [k, block]
    pieces on in-memory data (the output of each piece is overwritten)."""
    q = torch.randn(M, k)
    g = torch.randn(block, k)
    out = torch.empty(M, block)
    torch.matmul(q, g.T, out=out)                                  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, block):
        b = min(block, n - s)
        torch.matmul(q, g[:b].T, out=out[:, :b])
    return time.perf_counter() - t0, time.process_time() - c0


def throughput(tmp: Path, n: int, methods: list[str], shm: bool = False) -> list[dict]:
    """Rows for ``methods`` at N = n; ``shm``: also score graddot into /dev/shm (RAM), which separates
    the pipeline's own overhead from the disk's write bandwidth (M·N·4 bytes of scores)."""
    from fastinf.scoring.planning import DEFAULT_BLOCK_BYTES, _train_block_rows

    train = synthetic_store(tmp / f"train{n}", n, K, seed=1)
    test = synthetic_store(tmp / f"test{n}", M, K, seed=2)
    block = _train_block_rows(K, M, 1, DEFAULT_BLOCK_BYTES)
    flops = 2.0 * M * n * K
    rows = []
    runs = [(m, tmp) for m in methods]
    if "if" in methods:        # again, with the preconditioner fitted by the first call reused from precond/
        runs.append(("if", tmp))
    if shm and Path("/dev/shm").is_dir():
        runs.append(("graddot", Path(tempfile.mkdtemp(prefix="fastinf-bench-", dir="/dev/shm"))))
    for method, out_root in runs:
        (base0, cpu0) = matmul_baseline(n, K, block)
        t0, c0 = time.perf_counter(), time.process_time()
        s = score(GradientStore.open(test.path), GradientStore.open(train.path), method,
                  out=out_root / f"s-{method}{n}")
        t_fast, c_fast = time.perf_counter() - t0, time.process_time() - c0
        (base1, cpu1) = matmul_baseline(n, K, block)
        base, cpu = (base0 + base1) / 2, (cpu0 + cpu1) / 2
        label = method + (" (H reused)" if method == "if" and any(r["method"] == "if" for r in rows) else "")
        rows.append({"section": "throughput", "method": label, "N": n, "M": M, "k": K, "train_block": block,
                     "fastinf_s": round(t_fast, 3), "matmul_s": round(base, 3),
                     "matmul_s_before_after": [round(base0, 3), round(base1, 3)],
                     "fastinf_gflops": round(flops / t_fast / 1e9, 2), "matmul_gflops": round(flops / base / 1e9, 2),
                     "ratio": round(base / t_fast, 3),
                     "fastinf_cpu_s": round(c_fast, 3), "matmul_cpu_s": round(cpu, 3), "cpu_ratio": round(cpu / c_fast, 3),
                     "scores_written_gb": round(4 * M * n / 1e9, 2), "scores_on": "/tmp (disk)" if out_root == tmp
                     else "/dev/shm (RAM)"})
        shutil.rmtree(s.path)
        if out_root != tmp:
            shutil.rmtree(out_root, ignore_errors=True)
    shutil.rmtree(train.path)
    shutil.rmtree(test.path)
    return rows


def datainf_naive(q: torch.Tensor, G: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """The literal DataInf formula via the N×N Gram, in row blocks of train samples (fp32 torch)."""
    N, k = G.shape
    sq = (G.double() ** 2).sum(1)
    lam = float(0.1 * sq.sum() / (N * k))
    inv = (1.0 / (lam + sq)).float()
    out = torch.empty(q.shape[0], N)
    for s in range(0, N, block):
        gi = G[s:s + block]
        coef = (gi @ G.T) * inv                                    # (b, N) block of the Gram
        pre = (gi - coef @ G / N) / lam                            # rows: H̃⁻¹ g_i
        out[:, s:s + block] = q @ pre.T
    return out


def datainf_section(tmp: Path, n: int) -> dict:
    train = synthetic_store(tmp / "dtrain", n, K, seed=3)
    test = synthetic_store(tmp / "dtest", M, K, seed=4)
    t0 = time.perf_counter()
    s = score(test, train, "datainf", out=tmp / "dscores")
    t_fast = time.perf_counter() - t0
    G = torch.from_numpy(np.asarray(train.features("u0"), np.float32))
    q = torch.from_numpy(np.asarray(test.features("u0"), np.float32))
    t0 = time.perf_counter()
    naive = datainf_naive(q, G)
    t_naive = time.perf_counter() - t0
    fast = torch.from_numpy(np.array(s.unit_scores("u0")))
    rel = float((fast - naive).abs().max() / naive.abs().max())
    shutil.rmtree(s.path)
    return {"section": "datainf", "N": n, "M": M, "k": K, "fastinf_s": round(t_fast, 3),
            "naive_O(N^2)_s": round(t_naive, 3), "speedup": round(t_naive / t_fast, 2),
            "max_rel_diff": rel}


def memory_child(test: str, train: str, out: str) -> None:
    """Runs in the child process: score all units, print the peak RSS as JSON."""
    t0 = time.perf_counter()
    s = score(test, train, "graddot", out=out)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "wall_s": wall, "units": len(s.unit_names),
                      "n_test": s.n_test, "n_train": s.n_train}))


def memory_section(tmp: Path, n: int, units: int) -> dict:
    train = synthetic_store(tmp / "mtrain", n, K, units=units, seed=5)
    test = synthetic_store(tmp / "mtest", M, K, units=units, seed=6)
    res = subprocess.run([sys.executable, __file__, "--child", str(test.path), str(train.path), str(tmp / "mscores")],
                         capture_output=True, text=True, check=True)
    child = json.loads(res.stdout.strip().splitlines()[-1])
    flops = 2.0 * M * n * K * units
    return {"section": "memory", "N": n, "M": M, "k": K, "units": units,
            "peak_rss_gb": round(child["peak_rss_bytes"] / 1e9, 3), "limit_gb": 2.0,
            "ok": child["peak_rss_bytes"] < 2e9, "wall_s": round(child["wall_s"], 2),
            "gflops": round(flops / child["wall_s"] / 1e9, 2), "scores_on_disk_gb": round(4 * M * n * units / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "score.json"))
    args = ap.parse_args()
    if args.child:
        memory_child(*args.child)
        return
    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    n_datainf = 5_000 if args.quick else 20_000
    n_mem, mem_units = (20_000, 2) if args.quick else (200_000, 8)
    load0 = os.getloadavg()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fastinf-bench-score-", dir="/tmp"))
    try:
        for i, n in enumerate(sizes):
            rows += throughput(tmp, n, ["graddot", "if"] if i == 0 else ["graddot"], shm=i == len(sizes) - 1)
        rows.append(datainf_section(tmp, n_datainf))
        rows.append(memory_section(tmp, n_mem, mem_units))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = None
    result = {"benchmark": "score", "quick": args.quick, "git": sha, "torch": torch.__version__,
              "numpy": np.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "load_avg_before": [round(x, 2) for x in load0],
              "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "note": "shared 2-core machine with other engineers' jobs running: absolute times are noisy; "
                      "ratios are measured back to back in the same run",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in rows:
        if r["section"] == "throughput":
            print(f"score {r['method']:<14} N={r['N']:>9,}  fastinf {r['fastinf_gflops']:7.1f} GFLOP/s  "
                  f"matmul {r['matmul_gflops']:7.1f} GFLOP/s  ratio {r['ratio']:.2f} (CPU-time ratio "
                  f"{r['cpu_ratio']:.2f})  scores on {r['scores_on']}")
        elif r["section"] == "datainf":
            print(f"datainf N={r['N']:,}: linear form {r['fastinf_s']:.2f}s vs O(N^2) {r['naive_O(N^2)_s']:.2f}s "
                  f"-> {r['speedup']:.1f}x (max rel diff {r['max_rel_diff']:.1e})")
        else:
            print(f"memory N={r['N']:,} x M={r['M']:,} x {r['units']} units, k={r['k']}: peak RSS "
                  f"{r['peak_rss_gb']:.2f} GB (limit 2 GB, {'ok' if r['ok'] else 'OVER'}), {r['gflops']:.1f} GFLOP/s")
    print(f"load average before/after: {result['load_avg_before']} / {result['load_avg_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
