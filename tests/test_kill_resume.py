"""SIGKILL at a random point of extraction, scoring and index building, then resume -> the same bytes as
an uninterrupted run. Each test really kills a subprocess running the real command."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastinf.cli import main as fastinf_main
from fastinf.dist_score import score_distributed
from fastinf.errors import StoreError
from fastinf.store import GradientStore
from tests.scripts.assets import make_assets, store_files

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """The killed subprocess runs with one intra-op thread; so does the in-process reference (fp32 results
    are bitwise reproducible at a fixed thread count; see tests/test_distributed.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_when(cmd: list[str], ready, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. Fails if it ends on its own first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    t0 = time.monotonic()
    try:
        while proc.poll() is None and not ready():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{cmd[:4]} did not reach the kill point within {timeout}s")
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (f"the run ended (rc {proc.returncode}) before the kill point; "
                                                f"make it longer. stderr: {err.decode()[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("seed", [0])
def test_extraction_killed_then_resumed_is_byte_identical(tmp_path, one_thread, seed):
    assets = make_assets(tmp_path / "assets", n_train=120, n_test=4)
    args = ["extract", "--model", str(assets["model"]), "--data", str(assets["train"]), "--proj", "4x4",
            "--batch-size", "4", "--chunk-size", "4", "--max-length", "16", "--dtype", "fp32", "--no-progress"]
    out = tmp_path / "killed"
    k = random.Random(seed).randint(1, 10)                     # a random point: after k of 30 chunks
    _kill_when([sys.executable, "-m", "fastinf", *args, "--out", str(out)],
               lambda: _lines(out / "progress" / "rank-0.jsonl") >= k)
    with pytest.raises(StoreError, match="incomplete"):
        GradientStore.open(out)
    with pytest.raises(StoreError, match="resume"):            # no silent restart over a partial store
        _extract_no_resume(args, out)
    assert fastinf_main([*args, "--out", str(out), "--resume"]) == 0
    assert fastinf_main([*args, "--out", str(tmp_path / "ref")]) == 0
    a, b = store_files(tmp_path / "ref"), store_files(out)
    assert a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == []
    assert GradientStore.open(out).verify() == []


def _extract_no_resume(args: list[str], out: Path) -> None:
    """The library call behind `fastinf extract` without --resume (the CLI turns the error into rc 2)."""
    from fastinf.cli import build_parser

    ns = build_parser().parse_args([*args, "--out", str(out)])
    ns.func(ns)


def _synthetic_pair(tmp_path: Path, n: int, m: int, k: int, units: int):
    rng = np.random.default_rng(7)
    names = [f"u{i}" for i in range(units)]
    train = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((n, k)).astype(np.float32)
                                                           for u in names}, chunk_size=512)
    test = GradientStore.from_arrays(tmp_path / "test", {u: rng.standard_normal((m, k)).astype(np.float32)
                                                         for u in names}, chunk_size=16)
    return test, train


@pytest.mark.parametrize("method", ["datainf"])
def test_scoring_killed_then_resumed_is_byte_identical(tmp_path, one_thread, method):
    test, train = _synthetic_pair(tmp_path, n=480, m=24, k=16, units=2)
    out = tmp_path / "killed"
    k = random.Random(1).randint(5, 60)                        # after k of 2 x 120 blocks
    cmd = [sys.executable, "-m", "fastinf.dist_score", "--test", str(test.path), "--train", str(train.path),
           "--out", str(out), "--method", method, "--block-size", "4"]
    _kill_when(cmd, lambda: _lines(out / "progress" / "rank-0.jsonl") >= k)
    from fastinf.scores import ScoreSet

    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(out)
    resumed = score_distributed(test, train, method, out=out, block_size=4, resume=True)
    ref = score_distributed(test, train, method, out=tmp_path / "ref", block_size=4)
    a, b = store_files(ref.path), store_files(resumed.path)
    assert a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == []


def test_index_build_killed_then_rebuilt_is_byte_identical(tmp_path):
    """Index building writes each group's FAISS file atomically and the manifest last, so a killed build
    is refused as incomplete (never read as finished) and a rebuild gives the same files. (Index building
    restarts rather than resumes; see the report.)"""
    from fastinf.retrieval import build_index, open_index

    rng = np.random.default_rng(5)
    names = [f"u{i}" for i in range(6)]
    store = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((500, 8)).astype(np.float32)
                                                           for u in names}, chunk_size=128)
    out = tmp_path / "killed"
    k = random.Random(2).randint(1, 4)                         # after k of 6 group files
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "slow_index_build.py"), "0.4", "--", str(store.path),
           "--out", str(out), "--factory", "IVF4,Flat", "--seed", "3"]
    _kill_when(cmd, lambda: len(list(out.glob("g*.faiss"))) >= k)
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="interrupted"):
        open_index(out, store)
    rebuilt = build_index(store, out=out, factory="IVF4,Flat", seed=3, overwrite=True)
    ref = build_index(store, out=tmp_path / "ref", factory="IVF4,Flat", seed=3)
    files = sorted(p.name for p in ref.directory.glob("g*.faiss"))
    assert files == sorted(p.name for p in rebuilt.directory.glob("g*.faiss")) and len(files) == 6
    for f in files:
        assert (ref.directory / f).read_bytes() == (rebuilt.directory / f).read_bytes(), f
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (ref.directory, rebuilt.directory))
    for m in (ma, mb):
        m.pop("created"), m["build"].pop("seconds")
    assert ma == mb
