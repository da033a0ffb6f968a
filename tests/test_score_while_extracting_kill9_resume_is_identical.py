"""SIGKILL a real ``fastinf score --train-data`` run (score while extracting, with --keep-store) at a random
recorded (unit, train chunk), then ``--resume``: the scores and the kept store are byte-identical to an
uninterrupted run; without ``--resume`` the interrupted set is refused, never silently restarted."""
from __future__ import annotations

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
from tests.scripts.assets import make_assets, store_files

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """fp32 results are bitwise reproducible at a fixed thread count: the killed subprocess uses one."""
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
    assert proc.returncode == -signal.SIGKILL, f"the run ended (rc {proc.returncode}) first: {err.decode()[-1500:]}"


def _score_arrays(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "units").glob("*.npy"))}


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_score_while_extracting_resumes_to_identical_scores_and_store(tmp_path, one_thread, seed, capsys):
    assets = make_assets(tmp_path / "assets", n_train=120, n_test=4)
    test = tmp_path / "test"
    assert fastinf_main(["extract", "--model", str(assets["model"]), "--data", str(assets["test"]), "--proj",
                         "4x4", "--batch-size", "4", "--max-length", "16", "--out", str(test), "--no-progress"]) == 0
    args = ["score", "--test", str(test), "--train-data", str(assets["train"]), "--model", str(assets["model"]),
            "--method", "graddot", "--batch-size", "4", "--chunk-size", "4", "--dtype", "fp32", "--no-progress"]
    assert fastinf_main([*args, "--out", str(tmp_path / "ref"), "--keep-store", str(tmp_path / "ref_store")]) == 0
    n_units = len(list((tmp_path / "ref" / "units").glob("*.npy")))
    out, kept = tmp_path / "killed", tmp_path / "killed_store"
    k = random.Random(seed).randint(1, 8 * n_units)          # after k (unit, chunk) records of 30 x n_units
    _kill_when([sys.executable, "-m", "fastinf", *args, "--out", str(out), "--keep-store", str(kept)],
               lambda: _lines(out / "progress" / "rank-0.jsonl") >= k)
    capsys.readouterr()
    assert fastinf_main([*args, "--out", str(out), "--keep-store", str(kept)]) == 2   # refused, not restarted
    assert "interrupted" in capsys.readouterr().err
    assert fastinf_main([*args, "--out", str(out), "--keep-store", str(kept), "--resume"]) == 0
    ref = _score_arrays(tmp_path / "ref")
    assert ref and _score_arrays(out) == ref
    assert store_files(kept) == store_files(tmp_path / "ref_store")
    from fastinf import ScoreSet

    s = ScoreSet.open(out)
    assert s.n_train == 120 and np.abs(s.unit_scores(s.unit_names[0])).max() > 0
