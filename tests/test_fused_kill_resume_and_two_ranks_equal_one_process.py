"""A fused run (``fastinf score --aggregate``) SIGKILLed between committed tasks and resumed gives the
uninterrupted result bit for bit (float sums included); a 2-process gloo ``torchrun`` run gives the
1-process result bit for bit (same thread count); a refused resume changes nothing.

Each kill test really kills a subprocess running the real command (tests/scripts/slow_fused.py pauses after
every task so the kill lands between commits).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastinf.aggregation.parquet import read_parquet
from fastinf.cli.app import main as fastinf_main
from fastinf.errors import ConfigError, StoreMismatchError
from fastinf.scoring.fused import influence
from fastinf.scoring.fused_state import state_path
from fastinf.store import GradientStore

ROOT = Path(__file__).resolve().parents[1]
HOWS = "rank,vote,min_rank,mean,zmean,rrf"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", "FASTINF_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """The subprocesses run with one intra-op thread; so do the in-process runs (BLAS bits depend on it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(tmp_path: Path, n: int = 700, m: int = 40, units: int = 5):
    rng = np.random.default_rng(11)
    dims = [8 + 5 * i for i in range(units)]
    mk = lambda rows: {f"u{i}": rng.standard_normal((rows, k)).astype(np.float32) for i, k in enumerate(dims)}
    train = GradientStore.from_arrays(tmp_path / "train", mk(n), meta={"ids": np.arange(n) + 100}, chunk_size=128)
    test = GradientStore.from_arrays(tmp_path / "test", mk(m), meta={"ids": np.arange(m),
                                                                   "correct": rng.random(m) < 0.7})
    return test, train


def _args(test, train, out: Path, *extra: str) -> list[str]:
    """The command: test blocks of 8 rows, slabs for ~1 block per set (several tasks per unit)."""
    return ["--train", str(train.path), "--test", str(test.path), "--method", "datainf", "--aggregate", HOWS,
            "--groups", "u0,all,u1+u2", "--test-block", "8", "--slab-mb", "0.05", "--out", str(out),
            "--no-progress", *extra]


def _kill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    t0 = time.monotonic()
    try:
        while proc.poll() is None and not ready():
            assert time.monotonic() - t0 < timeout, "the run did not reach the kill point"
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"ended (rc {proc.returncode}) before the kill: {err.decode()[-1500:]}"


def _identical(a: Path, b: Path) -> None:
    ra, rb = read_parquet(a), read_parquet(b)
    assert sorted(ra) == sorted(rb)
    for key in ra:
        assert np.array_equal(ra[key], rb[key]), key          # every how, float sums too: bit for bit
    assert pq.read_table(a).equals(pq.read_table(b))


def test_fused_run_killed_then_resumed_is_bit_identical(tmp_path, one_thread):
    test, train = _pair(tmp_path)
    out = tmp_path / "killed.parquet"
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "slow_fused.py"), "0.15", "--",
           *_args(test, train, out, "--commit-s", "0", "--top-k-out", str(tmp_path / "top-k.parquet"))]
    _kill_when(cmd, lambda: state_path(out).exists())
    assert not out.exists() and not (tmp_path / "top-k.parquet").exists()
    assert fastinf_main(["score", *_args(test, train, out)]) == 2              # no silent restart
    with pytest.raises(StoreMismatchError, match="different request"):       # another request: refused
        influence(test, train, "datainf", HOWS, ["u0", "all"], test_block=8, slab_bytes=1 << 20, out=out,
                  resume=True)
    assert state_path(out).exists()
    assert fastinf_main(["score", *_args(test, train, out, "--resume", "--top-k-out",
                                         str(tmp_path / "top-k.parquet"))]) == 0
    assert not state_path(out).exists()
    ref = tmp_path / "ref.parquet"
    assert fastinf_main(["score", *_args(test, train, ref, "--top-k-out", str(tmp_path / "top-ref.parquet"))]) == 0
    _identical(out, ref)
    assert pq.read_table(tmp_path / "top-k.parquet").equals(pq.read_table(tmp_path / "top-ref.parquet"))


def test_resume_after_an_in_process_crash_and_overwrite(tmp_path, one_thread, monkeypatch):
    """A crash after 3 committed tasks (an exception, in process), then resume: the same bits; --overwrite
    discards a leftover state; resume without a state is refused."""
    from fastinf.scoring import fused

    test, train = _pair(tmp_path, n=300, m=24, units=3)
    out = tmp_path / "a.parquet"
    real, count = fused.run_task, [0]

    def crashing(*a, **k):
        count[0] += 1
        if count[0] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fused, "run_task", crashing)
    kw = dict(test_block=8, slab_bytes=1 << 10, commit_s=0, out=out)
    with pytest.raises(KeyboardInterrupt):
        influence(test, train, "if", HOWS, ["u0", "all"], **kw)
    monkeypatch.setattr(fused, "run_task", real)
    with pytest.raises(ConfigError, match="resume"):
        influence(test, train, "if", HOWS, ["u0", "all"], **kw)
    got = influence(test, train, "if", HOWS, ["u0", "all"], resume=True, **kw)
    ref = influence(test, train, "if", HOWS, ["u0", "all"], test_block=8, slab_bytes=1 << 10)
    for key, v in ref.scores.items():
        assert np.array_equal(got.scores[key], v), key
    state_path(out).write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a fastinf"):
        influence(test, train, "if", HOWS, ["u0", "all"], overwrite=True, **kw)
    state_path(out).unlink()
    with pytest.raises(ConfigError, match="nothing to resume"):
        influence(test, train, "if", HOWS, ["u0", "all"], resume=True, **kw)


def test_torchrun_two_ranks_equal_one_process(tmp_path, one_thread):
    """One launch runs two commands: per-unit tasks (with per-unit groups) and per-set tasks (top-k lists)."""
    test, train = _pair(tmp_path, n=500, m=36, units=4)
    runs = {"units": ["--per-unit"], "sets": ["--top-k-out", "TOP"]}
    argv: list[str] = []
    for name, extra in runs.items():
        top = str(tmp_path / f"top-{name}-dist.parquet")
        argv += ["::", *_args(test, train, tmp_path / f"{name}-dist.parquet", *[top if e == "TOP" else e for e in extra])]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "scripts" / "dist_fused.py"), *argv[1:]],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, extra in runs.items():
        top = str(tmp_path / f"top-{name}-one.parquet")
        one = tmp_path / f"{name}-one.parquet"
        assert fastinf_main(["score", *_args(test, train, one, *[top if e == "TOP" else e for e in extra])]) == 0
        _identical(tmp_path / f"{name}-dist.parquet", one)
        assert not state_path(tmp_path / f"{name}-dist.parquet").exists()
    assert pq.read_table(tmp_path / "top-sets-dist.parquet").equals(pq.read_table(tmp_path / "top-sets-one.parquet"))
