"""Benchmark: Rank and Vote aggregation, C++ (fastinf._C) vs a straightforward torch implementation.

Default problem (the issue's): N = 100,000 train samples, 10,000 rankers (20 units x 500 test samples).
Scores are synthetic (standard normal, float32), generated block by block from a seed so that nothing
of size rankers x N is ever held (that would be 4 GB).

1. Kernels, same blocks, same run: the C++ path (`fastinf._native.accumulate_ranks`: radix sort for Rank,
   partial radix selection for Vote) against torch (`argsort` along each ranker's row, ranks scattered
   back, summed; Vote adds `clamp(K - rank, min=0)`), both with the same thread count. Block generation
   is not timed. The numpy reference is timed on a few blocks for scale.
2. End to end: `fastinf.aggregate.aggregate_all` over a lazy ScoreSet-like source, Rank and Vote for the
   groups first/middle/last/all in one pass (generation included), with the process's peak RSS.

Writes bench/results/aggregate.json and prints a short table. Times are wall-clock on a shared machine;
compare the ratios, which are measured in the same run on the same blocks.

    python bench/aggregate.py                      # the issue's size (a few minutes on 2 cores)
    python bench/aggregate.py --units 4 --tests 50  # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastinf.aggregation import _native
from fastinf.aggregation.aggregate import aggregate_all, vote_k

ROOT = Path(__file__).resolve().parents[1]


def make_block(unit: int, m0: int, m1: int, n: int) -> np.ndarray:
    """Deterministic synthetic scores of one unit for test rows m0:m1; float32 [m1 - m0, N]."""
    rng = np.random.default_rng([unit, m0])
    return rng.standard_normal((m1 - m0, n), dtype=np.float32)


class LazyScores:
    """A ScoreSet-like source: ``unit_scores(name)[m0:m1]`` generates the block on demand."""

    def __init__(self, n_units: int, n_test: int, n_train: int) -> None:
        self.unit_names = [f"unit{i}" for i in range(n_units)]
        self.n_test, self.n_train, self.test_correct = n_test, n_train, None
        from fastinf.extraction.units import Unit

        # an embedding, n_units - 2 transformer blocks, a head: so that first/middle/last all match
        last = n_units - 1
        self.units = [Unit(name=nm, kind="embedding" if i == 0 else "head" if i == last else "linear",
                           block=i - 1, role="embed" if i == 0 else "head" if i == last else "attn.v",
                           d_out=1, d_in=1, bias=False)
                      for i, nm in enumerate(self.unit_names)]

    def unit_scores(self, name: str):
        u, n = self.unit_names.index(name), self.n_train

        class _Rows:
            def __getitem__(self, sl: slice) -> np.ndarray:
                return make_block(u, sl.start, sl.stop, n)

        return _Rows()


def torch_rank_vote(x: torch.Tensor, k: int, rank_acc: torch.Tensor | None, vote_acc: torch.Tensor | None) -> None:
    """The straightforward implementation: argsort each ranker's row, scatter positions back as ranks."""
    order = torch.argsort(x, dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
    if rank_acc is not None:
        rank_acc += ranks.sum(0)
    if vote_acc is not None:
        vote_acc += (k - ranks).clamp_min_(0).sum(0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--units", type=int, default=20)
    ap.add_argument("--tests", type=int, default=500)
    ap.add_argument("--block-rows", type=int, default=50)
    ap.add_argument("--vote-p", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None, help="threads for both paths (default: all CPUs)")
    ap.add_argument("--numpy-blocks", type=int, default=2, help="blocks timed with the numpy reference")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "aggregate.json"))
    args = ap.parse_args()

    n, b = args.n_train, args.block_rows
    k = vote_k(args.vote_p, n)
    threads = args.threads or _native.default_threads()
    torch.set_num_threads(threads)
    blocks = [(u, m0, min(args.tests, m0 + b)) for u in range(args.units) for m0 in range(0, args.tests, b)]
    rankers = args.units * args.tests
    load_before = os.getloadavg()

    t = {"cpp_rank": 0.0, "cpp_vote": 0.0, "torch_rank": 0.0, "torch_vote": 0.0, "numpy_rank_vote": 0.0}
    cpp_rank, cpp_vote = np.zeros(n, np.int64), np.zeros(n, np.int64)
    th_rank, th_vote = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    numpy_rows = 0
    # warm-up (thread pools, allocator)
    warm = make_block(0, 0, min(b, 4), n)
    _native.accumulate_ranks(warm, rank_sum2=np.zeros(n, np.int64))
    torch_rank_vote(torch.from_numpy(warm), k, torch.zeros(n, dtype=torch.int64), None)
    for i, (u, m0, m1) in enumerate(blocks):
        x = make_block(u, m0, m1, n)
        xt = torch.from_numpy(x)
        s = time.perf_counter()
        _native.accumulate_ranks(x, rank_sum2=cpp_rank, n_threads=threads)
        t["cpp_rank"] += time.perf_counter() - s
        s = time.perf_counter()
        _native.accumulate_ranks(x, vote_k=k, vote_sum2=cpp_vote, n_threads=threads)
        t["cpp_vote"] += time.perf_counter() - s
        s = time.perf_counter()
        torch_rank_vote(xt, k, th_rank, None)
        t["torch_rank"] += time.perf_counter() - s
        s = time.perf_counter()
        torch_rank_vote(xt, k, None, th_vote)
        t["torch_vote"] += time.perf_counter() - s
        if i < args.numpy_blocks:
            s = time.perf_counter()
            _native.accumulate_ranks(x, vote_k=k, rank_sum2=np.zeros(n, np.int64), vote_sum2=np.zeros(n, np.int64),
                                     backend="numpy")
            t["numpy_rank_vote"] += time.perf_counter() - s
            numpy_rows += x.shape[0]

    # agreement: torch breaks ties by position, fastinf averages them; with continuous scores the two
    # mean ranks differ by at most a fraction of a rank
    mean_rank_gap = float(np.abs(cpp_rank / 2.0 - th_rank.numpy()).max() / rankers)
    vote_gap = float(np.abs(cpp_vote / 2.0 - th_vote.numpy()).max() / rankers)

    src = LazyScores(args.units, args.tests, n)
    s = time.perf_counter()
    res = aggregate_all(src, ["rank", "vote"], vote_p=args.vote_p, groups=["first", "middle", "last", "all"]
                        if args.units >= 4 else None, block_bytes=b * 4 * n, n_threads=threads)
    e2e = time.perf_counter() - s

    out = {
        "benchmark": "aggregate",
        "problem": {"n_train": n, "units": args.units, "tests": args.tests, "rankers": rankers, "vote_k": k,
                    "block_rows": b},
        "threads": threads,
        "seconds": {key: round(v, 3) for key, v in t.items()},
        "per_ranker_ms": {"cpp_rank": 1e3 * t["cpp_rank"] / rankers, "cpp_vote": 1e3 * t["cpp_vote"] / rankers,
                          "torch_rank": 1e3 * t["torch_rank"] / rankers, "torch_vote": 1e3 * t["torch_vote"] / rankers,
                          "numpy_rank_vote": 1e3 * t["numpy_rank_vote"] / max(1, numpy_rows)},
        "speedup_vs_torch": {"rank": t["torch_rank"] / t["cpp_rank"], "vote": t["torch_vote"] / t["cpp_vote"]},
        "agreement": {"max_mean_rank_gap": mean_rank_gap, "max_vote_gap_per_ranker": vote_gap},
        "end_to_end": {"seconds": round(e2e, 3), "groups": list(res.groups), "hows": ["rank", "vote"],
                       "peak_rss_mb": round(peak_rss_mb(), 1)},
        "targets": {"vote_speedup": 3.0, "rank_speedup": 2.0, "peak_rss_mb": 2048},
        "env": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "git": git_sha(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "note": "shared machine: other processes were running; ratios are measured on the same blocks "
                        "in the same run"},
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")

    pr = out["per_ranker_ms"]
    print(f"N={n}  rankers={rankers} ({args.units} units x {args.tests} test)  K={k}  threads={threads}  "
          f"load {load_before[0]:.1f}")
    print(f"{'':6} {'C++ ms/ranker':>14} {'torch ms/ranker':>16} {'speedup':>8}")
    for how in ("rank", "vote"):
        print(f"{how:6} {pr['cpp_' + how]:14.3f} {pr['torch_' + how]:16.3f} {out['speedup_vs_torch'][how]:7.1f}x")
    print(f"numpy reference (rank+vote): {pr['numpy_rank_vote']:.2f} ms/ranker")
    print(f"end to end (rank+vote, groups {', '.join(res.groups)}): {e2e:.1f} s, peak RSS "
          f"{out['end_to_end']['peak_rss_mb']:.0f} MB")
    print(f"agreement with torch: max mean-rank gap {mean_rank_gap:.2e}, vote gap/ranker {vote_gap:.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
