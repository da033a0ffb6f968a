"""Distributed extraction and scoring: a 2-process gloo ``torchrun`` run equals the 1-process run byte for
byte; shards are deterministic and independent of the number of ranks; a failed rank leaves a resumable
(not a corrupt) store or score set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastinf
from fastinf.cli.app import main as fastinf_main
from fastinf.scoring.dist_score import owner_of, score_distributed, train_blocks
from fastinf.errors import StoreError, StoreLockedError, StoreMismatchError
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore, StoreWriter
from tests.scripts.assets import make_assets, store_files
from tests.scripts.dist_pipeline import EXTRACT

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "scripts" / "dist_pipeline.py"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _synthetic(tmp_path: Path, n: int = 203, m: int = 11, k: int = 12, units: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"u{i}" for i in range(units)]
    train = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((n, k)).astype(np.float32)
                                                           for u in names}, chunk_size=32)
    test = GradientStore.from_arrays(tmp_path / "test", {u: rng.standard_normal((m, k)).astype(np.float32)
                                                         for u in names}, chunk_size=8)
    return test, train


@pytest.fixture
def one_thread():
    """torchrun starts each rank with OMP_NUM_THREADS=1. fp32 features are bitwise reproducible only at a
    fixed intra-op thread count (threads split the reductions of a few GEMMs differently: last-bit
    differences in ~5% of rows at 2 vs 1 threads), so the one-process reference runs with 1 thread too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torchrun_two_ranks_equal_one_process(tmp_path, one_thread):
    """``torchrun --nproc-per-node 2`` (gloo, CPU) extraction and scoring == the same commands in 1 process."""
    assets = make_assets(tmp_path / "assets", n_train=61, n_test=9)
    dist_out, one = tmp_path / "dist", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(PIPELINE), str(tmp_path / "assets"), str(dist_out)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "test"):
        assert fastinf_main(["extract", "--model", str(assets["model"]), "--data", str(assets[split]),
                             "--out", str(one / split), *EXTRACT]) == 0
        a, b = store_files(one / split), store_files(dist_out / split)
        assert a.keys() == b.keys()
        assert [f for f in a if a[f] != b[f]] == [], f"{split} store files differ between 1 and 2 ranks"
    test, train = GradientStore.open(one / "test"), GradientStore.open(one / "train")
    assert train.n == 61 and train.manifest["n_chunks"] == 4     # chunks 0, 2 on rank 0; 1, 3 on rank 1
    for method in ("graddot", "if"):
        s1 = score_distributed(test, train, method, out=one / f"scores-{method}", block_size=10)
        s2 = ScoreSet.open(dist_out / f"scores-{method}")
        a, b = store_files(s1.path), store_files(s2.path)
        assert a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == ["manifest.json"]
        ma, mb = (json.loads(x["manifest.json"]) for x in (a, b))  # only the stores' paths may differ
        for m in (ma, mb):
            for c in m["sources"]["checkpoints"]:
                c.pop("test"), c.pop("train")
        assert ma == mb
        # and the same numbers as the one-process estimator (float64 GEMM, float32 result)
        ref = fastinf.score(test, train, method, precision="float64")
        for name in ref.unit_names:
            np.testing.assert_array_equal(np.asarray(s2.unit_scores(name)), np.asarray(ref.unit_scores(name)))


def test_blocks_partition_the_columns_round_robin():
    blocks = train_blocks(1003, 100)
    assert blocks[0] == (0, 100) and blocks[-1] == (1000, 1003) and len(blocks) == 11
    assert sum(b - a for a, b in blocks) == 1003
    for world in (1, 2, 3, 7):
        owned = [[j for j in range(len(blocks)) if owner_of(j, world) == r] for r in range(world)]
        assert sorted(sum(owned, [])) == list(range(len(blocks)))
        assert max(map(len, owned)) - min(map(len, owned)) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_scores_independent_of_world_size_and_resumable_after_a_failed_rank(tmp_path, world):
    test, train = _synthetic(tmp_path)
    ref = score_distributed(test, train, "gradcos", out=tmp_path / "ref", block_size=17)
    out = tmp_path / "s"
    # ranks run one after another without a process group; the last rank never runs (it "failed")
    with pytest.raises(StoreError, match="never written"):      # rank 0 cannot mark the set complete
        score_distributed(test, train, "gradcos", out=out, block_size=17, shard=(0, world))
    for r in range(1, world - 1):
        with pytest.raises(StoreError, match="incomplete"):     # its blocks land; the set stays incomplete
            score_distributed(test, train, "gradcos", out=out, block_size=17, shard=(r, world), resume=True)
    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(out)                                        # readers refuse the partial set
    with pytest.raises(StoreError, match="resume"):
        score_distributed(test, train, "gradcos", out=out, block_size=17)      # no silent restart
    with pytest.raises(StoreMismatchError, match="different run"):
        score_distributed(test, train, "graddot", out=out, block_size=17, resume=True)
    s = score_distributed(test, train, "gradcos", out=out, block_size=17, resume=True)   # one process finishes
    a, b = store_files(ref.path), store_files(s.path)
    assert [f for f in a if a[f] != b[f]] == [] and not (out / "progress").exists()


def test_failed_extraction_rank_leaves_a_resumable_store(tmp_path):
    """Rank 1 of 2 never runs: rank 0's finalize refuses to mark the store complete; a resume finishes it
    and equals a one-process store byte for byte."""
    rng = np.random.default_rng(3)
    feats = {"a": rng.standard_normal((50, 6)).astype(np.float32)}
    ref = GradientStore.from_arrays(tmp_path / "ref", feats, chunk_size=8, dtype="fp32")
    ident = ref.identity
    kw = dict(identity=ident, units=ref.units, feature_dims={"a": 6}, n=50, dtype="fp32", chunk_size=8)
    w0 = StoreWriter(tmp_path / "s", rank=0, world=2, **kw)
    for c in w0.pending_chunks():
        a, b = w0.chunk_rows(c)
        w0.write_chunk(c, {"a": feats["a"][a:b]}, {})
    with pytest.raises(StoreError, match="never written"):
        w0.finalize()
    with pytest.raises(StoreError, match="incomplete"):
        GradientStore.open(tmp_path / "s")
    w = StoreWriter(tmp_path / "s", resume=True, **kw)
    assert w.pending_chunks() == [1, 3, 5]                        # exactly rank 1's chunks
    for c in w.pending_chunks():
        a, b = w.chunk_rows(c)
        w.write_chunk(c, {"a": feats["a"][a:b]}, {})
    w.finalize()
    x, y = store_files(ref.path), store_files(tmp_path / "s")
    assert [f for f in x if x[f] != y[f]] == []


def test_second_scoring_writer_is_refused(tmp_path):
    from fastinf.store import WriterLock

    test, train = _synthetic(tmp_path, n=40)
    out = tmp_path / "s"
    with pytest.raises(StoreError):
        score_distributed(test, train, "graddot", out=out, block_size=8, shard=(0, 2))
    held = WriterLock(out / "locks" / "rank-0.lock")
    held.acquire()                                                # another live writer of rank 0
    try:
        with pytest.raises(StoreLockedError, match="another process"):
            score_distributed(test, train, "graddot", out=out, block_size=8, resume=True)
    finally:
        held.release()
    s = score_distributed(test, train, "graddot", out=out, block_size=8, resume=True)
    assert s.n_train == 40


def test_block_size_comes_from_the_plan_when_not_given(tmp_path):
    from fastinf.extraction.plan import auto_block_size

    test, train = _synthetic(tmp_path, n=300, m=5, k=8)
    s = score_distributed(test, train, "graddot", out=tmp_path / "s", device_memory="8K")
    want = auto_block_size([8, 8], 5, n=300, dtype=train.dtype, device_memory="8K")
    assert 1 < want < 300 and s.params["dist"]["block_size"] == want     # an 8 KiB budget forces small blocks
    ref = score_distributed(test, train, "graddot", out=tmp_path / "r", block_size=300)
    np.testing.assert_array_equal(np.asarray(s.unit_scores("u0")), np.asarray(ref.unit_scores("u0")))
