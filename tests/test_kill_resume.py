"""SIGKILL at a random point of extraction, scoring and index building, then resume -> the same bytes as
an uninterrupted run. Each kill test really kills a subprocess running the real command."""
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

from fastinf.cli.app import main as fastinf_main
from fastinf.scoring.dist_score import score_distributed
from fastinf.errors import StoreError, StoreMismatchError
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
    from fastinf.cli.app import build_parser

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
    from fastinf.scoring.scores import ScoreSet

    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(out)
    resumed = score_distributed(test, train, method, out=out, block_size=4, resume=True)
    ref = score_distributed(test, train, method, out=tmp_path / "ref", block_size=4)
    a, b = store_files(ref.path), store_files(resumed.path)
    assert a.keys() == b.keys() and [f for f in a if a[f] != b[f]] == []


@pytest.fixture
def faiss_one_thread():
    """The killed build runs with OMP_NUM_THREADS=1; the in-process resume and reference use one FAISS
    thread too, so every group file is produced under the same threading as the others."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _index_dir_files(directory: Path) -> dict[str, bytes]:
    """Every file of an index directory except the build lock (a killed builder's lock is stale and taken
    over by the next build of the directory)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.parent.name != "locks"}


def _without_clock(manifest: bytes) -> dict:
    """The manifest minus its two wall-clock fields (creation time, build seconds): everything else must
    be equal, and the serialisation is canonical (sorted keys), so equal dicts mean equal bytes."""
    m = json.loads(manifest)
    m.pop("created"), m["build"].pop("seconds")
    return m


def test_index_build_killed_then_resumed_is_byte_identical(tmp_path, faiss_one_thread):
    """SIGKILL `fastinf index build` after k of 6 IVF group files exist; a resume with other parameters is
    refused and changes nothing; the resume with --resume keeps the finished files (not rewritten) and the
    directory then equals an uninterrupted build's byte for byte (IVF training on a seeded sample with
    FAISS's fixed k-means seed is deterministic at a fixed thread count)."""
    from fastinf.retrieval.build import build_index
    from fastinf.retrieval.index import open_index

    rng = np.random.default_rng(5)
    names = [f"u{i}" for i in range(6)]
    store = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((500, 8)).astype(np.float32)
                                                           for u in names}, chunk_size=128)
    out = tmp_path / "killed"
    build = [str(store.path), "--out", str(out), "--factory", "IVF4,Flat", "--seed", "3"]
    k = random.Random(2).randint(1, 4)                         # after k of 6 group files
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "slow_index_build.py"), "0.4", "--", *build]
    _kill_when(cmd, lambda: len(list(out.glob("g*.faiss"))) >= k)
    assert not (out / "manifest.json").exists() and (out / "build.json").is_file()
    with pytest.raises(StoreError, match="interrupted.*--resume"):
        open_index(out, store)
    def identity(name: str) -> tuple[int, int]:
        st = (out / name).stat()
        return st.st_ino, st.st_mtime_ns

    kept = {p.name: identity(p.name) for p in out.glob("g*.faiss")}
    assert 1 <= len(kept) < 6, f"killed with {sorted(kept)} written; the test needs a partial build"

    assert fastinf_main(["index", "build", *build]) == 2          # no silent restart over a partial build
    partial = _index_dir_files(out)
    for other, field in (({"seed": 4}, "seed"), ({"factory": "IVF8,Flat"}, "factory"),
                         ({"layers": "u0,u1"}, "groups")):      # not the killed request: refused, no change
        with pytest.raises(StoreMismatchError, match=rf"\({field}\b.*: the interrupted build"):
            build_index(store, out=out, resume=True, **{"factory": "IVF4,Flat", "seed": 3, **other})
        assert _index_dir_files(out) == partial, f"a refused resume ({other}) changed the partial build"
    assert fastinf_main(["index", "build", *build, "--resume"]) == 0
    assert {n: identity(n) for n in kept} == kept, "resume rebuilt group files the killed run had finished"

    ref = build_index(store, out=tmp_path / "ref", factory="IVF4,Flat", seed=3)
    a, b = _index_dir_files(ref.directory), _index_dir_files(out)
    assert sorted(a) == sorted(b) == sorted(["build.json", "manifest.json", *[f"g{i}.faiss" for i in range(6)]])
    assert not (out / "locks").exists()
    assert [f for f in a if f != "manifest.json" and a[f] != b[f]] == []
    assert _without_clock(a["manifest.json"]) == _without_clock(b["manifest.json"])
    open_index(out, store)
