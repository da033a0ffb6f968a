"""Benchmark: fused score -> aggregate (``fastinf.influence``) at scale, against a plain matmul of the same
shapes and against the two-stage path (``fastinf.score`` + ``fastinf.aggregate_all`` + Parquet).

Stores are synthetic: random fp16 features written through the real ``fastinf.store.StoreWriter``
(chunked, crash-safe writes, checksums), MiniLM-shaped units (input embedding, linear units spread over
blocks, head) at 16x16 (k = 256). Each measured run is a child process (peak RSS = its ru_maxrss,
bytes = its /proc/self/io ``wchar`` and the sizes of the files it created):

1. fused: N train x M test x U units, ``how = rank, vote, mean`` over the groups first, middle, last, all,
   Parquet written; wall time, bytes, peak RSS, the pass's own split (scoring vs rank/accumulate), and
   the share of a plain ``torch.matmul`` of the same GEMM shapes (in-memory fp32, timed in the same child
   right after, for ``--baseline-units`` units and scaled to U): ``gemm_share = matmul_s / wall_s`` (end
   to end: opening the stores, the pass, the Parquet), ``gemm_share_of_pass`` (the pass alone) and
   ``rank_share_of_pass`` (time in ranking / accumulating the slabs).
2. same-run comparison at N = ``--two-stage-n``: fused and two-stage (score set on disk, then
   aggregation, then Parquet), wall / bytes / RSS, and whether the results agree (rank/vote exactly).
3. the loop order (``--compare-loop``): the fused run again with ``--slab-mb 0`` (one test block per set:
   each train block read, decoded and checksum-looked-up once per *test block*, the loop before the
   set loop) against the default set loop (read once per set of test blocks whose slabs fit
   ``--slab-mb``); wall and peak RSS of both, and that the integer sums agree exactly.

Writes bench/results/stream.json (``--out``). The machine may be shared: the load average is recorded.

    python bench/stream.py                                   # the issue's sizes (N=1M, M=1000, U=39)
    python bench/stream.py --n 20000 --m 64 --units 8 --two-stage-n 5000     # seconds
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

ROOT = Path(__file__).resolve().parents[1]
HOWS = ["rank", "vote", "mean"]
GROUPS = ["first", "middle", "last", "all"]
CHUNK = 1 << 15


def _units(u: int, k_out: int, k_in: int) -> list:
    """MiniLM-shaped synthetic units: embedding (block -1), u - 2 linear units over blocks, head."""
    from fastinf.extraction.units import Unit

    inner = max(1, u - 2)
    per_block = 3 if inner >= 3 else 1
    n_blocks = -(-inner // per_block)
    roles = ["attn.q", "attn.v", "mlp.down"]
    out = [Unit(name="embed", kind="embedding", block=-1, role="embed", d_out=k_out, d_in=k_in, bias=False)]
    out += [Unit(name=f"b{i // per_block}.{roles[i % per_block]}", kind="linear", block=i // per_block,
                 role=roles[i % per_block], d_out=k_out, d_in=k_in, bias=False) for i in range(inner)]
    out.append(Unit(name="head", kind="head", block=n_blocks, role="head", d_out=k_out, d_in=k_in, bias=False))
    return out[:u] if u >= 2 else out[:1]


def write_store(path: Path, n: int, units: list, k: int, seed: int, dataset: str) -> float:
    """Random fp16 features through StoreWriter, one random [chunk, k] block per chunk (units get
    row-shifted copies, so they score differently). Returns the write time in seconds."""
    from fastinf.store.writer import StoreWriter

    identity = {"model": {"name": "bench-stream", "fingerprint": "bench-stream"},
                "projection": {"kind": "kron", "k_out": 16, "k_in": k // 16, "seed": 0},
                "task": "synthetic", "dataset": {"fingerprint": dataset}}
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    w = StoreWriter(path, identity=identity, units=units, feature_dims={u.name: k for u in units}, n=n,
                    dtype="float16", chunk_size=CHUNK, overwrite=True)
    for c in w.pending_chunks():
        a, b = w.chunk_rows(c)
        base = rng.standard_normal((b - a, k), dtype=np.float32)
        feats = {u.name: np.roll(base, 7 * i, axis=0) for i, u in enumerate(units)}
        w.write_chunk(c, feats, {"ids": np.arange(a, b), "correct": np.ones(b - a, bool)})
    w.finalize()
    return time.perf_counter() - t0


def _io() -> dict:
    """This process's I/O counters (Linux /proc/self/io): bytes passed to write(2), bytes to storage."""
    try:
        rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {"wchar": int(rows["wchar"]), "write_bytes": int(rows["write_bytes"])}
    except (OSError, KeyError, ValueError):
        return {"wchar": -1, "write_bytes": -1}


def _peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits
    from the parent that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _matmul_baseline(run_meta: dict, n: int, m: int, k: int, units: int, block_bytes: int) -> float:
    """Seconds of a plain fp32 torch.matmul over the fused pass's GEMM shapes, ``units`` units."""
    import torch

    from fastinf.scoring.planning import _train_block_rows

    rows = run_meta["test_block"]
    nb = min(n, _train_block_rows(k, rows, 1, block_bytes))
    q, g, out = torch.randn(rows, k), torch.randn(nb, k), torch.empty(rows, nb)
    torch.matmul(q, g.T, out=out)
    t0 = time.perf_counter()
    for _ in range(units):
        for r0 in range(0, m, rows):
            qq = q[:min(rows, m - r0)]
            for n0 in range(0, n, nb):
                b = min(nb, n - n0)
                torch.matmul(qq, g[:b].T, out=out[:len(qq), :b])
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """One measured run (``--child fused|two_stage``); prints a JSON line."""
    import fastinf
    from fastinf.aggregation.parquet import write_parquet

    fastinf.influence, fastinf.score, fastinf.aggregate_all          # imports outside the timed region
    work = Path(args.work)
    io0, t0 = _io(), time.perf_counter()
    if args.child == "fused":
        res = fastinf.influence(args.test, args.train, args.method, HOWS, GROUPS, out=work / "agg.parquet",
                                block_bytes=args.block_mb << 20, threads=args.threads,
                                slab_bytes=max(1, args.slab_mb << 20))
    else:
        scores = fastinf.score(args.test, args.train, args.method, out=work / "scores",
                               block_bytes=args.block_mb << 20)
        res = fastinf.aggregate_all(scores, HOWS, groups=GROUPS, n_threads=args.threads)
        write_parquet(res, work / "agg.parquet", train_ids=np.asarray(scores.train_ids))
    wall = time.perf_counter() - t0
    io1 = _io()
    row = {"wall_s": wall, "peak_rss_bytes": _peak_rss(),
           "bytes_written_files": _tree_bytes(work), "wchar": io1["wchar"] - io0["wchar"],
           "write_bytes": io1["write_bytes"] - io0["write_bytes"]}
    if args.child == "fused":
        row["timing"] = res.meta["timing"]
        row["fused"] = res.meta["fused"]
        if args.baseline_units:
            base = _matmul_baseline(res.meta["fused"], args.n_rows, args.m, args.k, args.baseline_units,
                                    args.block_mb << 20)
            row["matmul_s"] = base * args.units / args.baseline_units
            row["matmul_units_timed"] = args.baseline_units
            pass_s = res.meta["timing"]["wall_s"]            # the pass alone: no store opening, no Parquet
            row["gemm_share"] = row["matmul_s"] / wall
            row["gemm_share_of_pass"] = row["matmul_s"] / pass_s
            row["rank_share_of_pass"] = res.meta["timing"]["aggregate_s"] / pass_s
    np.savez(work / "result.npz", **{f"{g}/{h}": v for (g, h), v in res.scores.items()})
    print("RESULT " + json.dumps(row))


def run_child(kind: str, test: Path, train: Path, work: Path, n: int, a: argparse.Namespace,
              baseline_units: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--test", str(test), "--train", str(train),
           "--work", str(work), "--method", a.method, "--block-mb", str(a.block_mb), "--n-rows", str(n),
           "--m", str(a.m), "--units", str(a.units), "--k", str(a.k), "--baseline-units", str(baseline_units),
           "--slab-mb", str(a.slab_mb)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _agree(a: Path, b: Path) -> dict:
    """Do two runs' results agree (rank / vote exactly, mean to 1e-6 relative)?"""
    with np.load(a) as x, np.load(b) as y:
        exact = all(np.array_equal(x[key], y[key]) for key in x.files if not key.endswith("/mean"))
        rel = max(float(np.max(np.abs(x[key] - y[key]) / np.maximum(np.abs(y[key]), 1e-30)))
                  for key in x.files if key.endswith("/mean"))
    return {"rank_vote_identical": bool(exact), "mean_max_rel_diff": rel}


def _loop_comparison(tmp: Path, a: argparse.Namespace, set_loop: dict) -> dict:
    """The fused run with one test block per set (``--slab-mb 0``) against the set loop run before it."""
    one = run_child("fused", tmp / "test", tmp / "train", tmp / "fused_per_block", a.n,
                    argparse.Namespace(**{**vars(a), "slab_mb": 0}))
    agree = _agree(tmp / "fused_per_block" / "result.npz", tmp / "fused" / "result.npz")
    shutil.rmtree(tmp / "fused_per_block")
    return {"wall_s": one["wall_s"], "peak_rss_bytes": one["peak_rss_bytes"], "set_blocks": one["fused"]["set_blocks"],
            "set_loop_set_blocks": set_loop["fused"]["set_blocks"], "agreement": agree,
            "speedup_of_set_loop": one["wall_s"] / set_loop["wall_s"]}


def _versions() -> dict:
    import torch

    import fastinf

    return {"fastinf": fastinf.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def main(a: argparse.Namespace) -> dict:
    from fastinf.store.reader import GradientStore

    tmp = Path(tempfile.mkdtemp(prefix="fastinf-bench-stream-", dir=a.tmp))
    units = _units(a.units, 16, a.k // 16)
    result: dict = {"config": {**{k: v for k, v in vars(a).items() if k not in ("child",)},
                               "hows": HOWS, "groups": GROUPS},
                    "store": "synthetic fp16 features written through fastinf.store.StoreWriter (chunked writes, "
                             "checksums); units MiniLM-shaped (embedding, linear over blocks, head), "
                             f"k = {a.k}", "versions": _versions(), "loadavg_before": os.getloadavg()}
    try:
        t_test = write_store(tmp / "test", a.m, units, a.k, 1, "test")
        t_train = write_store(tmp / "train", a.n, units, a.k, 2, "train")
        GradientStore.open(tmp / "train")
        result["store_write_s"] = {"test": t_test, "train": t_train,
                                   "train_bytes": _tree_bytes(tmp / "train")}
        result["fused"] = run_child("fused", tmp / "test", tmp / "train", tmp / "fused", a.n, a,
                                    baseline_units=min(a.units, a.baseline_units))
        if a.compare_loop:
            result["per_block_loop"] = _loop_comparison(tmp, a, result["fused"])
        shutil.rmtree(tmp / "fused")
        if a.two_stage_n:
            write_store(tmp / "train2", a.two_stage_n, units, a.k, 3, "train2")
            small = {"n": a.two_stage_n}
            for kind in ("fused", "two_stage"):
                small[kind] = run_child(kind, tmp / "test", tmp / "train2", tmp / f"small_{kind}", a.two_stage_n, a)
            small["agreement"] = _agree(tmp / "small_fused" / "result.npz", tmp / "small_two_stage" / "result.npz")
            small["ratios"] = {k: small["two_stage"][k] / max(small["fused"][k], 1)
                               for k in ("wall_s", "peak_rss_bytes", "bytes_written_files")}
            result["two_stage_comparison"] = small
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="train rows")
    p.add_argument("--m", type=int, default=1000, help="test rows")
    p.add_argument("--units", type=int, default=39, help="units (MiniLM 16x16: 39)")
    p.add_argument("--two-stage-n", type=int, default=100_000, help="train rows of the comparison (0: skip)")
    p.add_argument("--k", type=int, default=256, help="features per unit (16x16 = 256)")
    p.add_argument("--method", default="graddot")
    p.add_argument("--block-mb", type=int, default=256, help="block_bytes of both paths, MiB")
    p.add_argument("--threads", type=int, default=None, help="C++ rank threads (default: all)")
    p.add_argument("--slab-mb", type=int, default=1024, help="fused: slabs of one set of test blocks, MiB "
                                                               "(0: one test block per set)")
    p.add_argument("--compare-loop", type=int, default=1, help="also run the per-test-block loop (1) or not (0)")
    p.add_argument("--baseline-units", type=int, default=2, help="units timed for the matmul baseline")
    p.add_argument("--tmp", default=None, help="directory for the stores (default: the system temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stream.json"))
    # child mode (internal)
    p.add_argument("--child", choices=["fused", "two_stage"], help=argparse.SUPPRESS)
    for name in ("--test", "--train", "--work"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--n-rows", type=int, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    args = _parser().parse_args()
    if args.child:
        child(args)
        sys.exit(0)
    res = main(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
