"""SIGKILL at random points of extract, score, dist_score, index build and a small `fastinf run`, then
resume: the result equals an uninterrupted run (tests/scripts/fault_inject.py; the slow test runs it with a
few kills, by hand it takes ``--kills N``). The fast tests pin that its comparison really tells results apart."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.scripts.fault_inject import compare

ROOT = Path(__file__).resolve().parents[1]


def _tree(d: Path, value: float = 1.0) -> Path:
    (d / "units").mkdir(parents=True)
    np.save(d / "units" / "0.npy", np.full(4, value, np.float32))
    (d / "manifest.json").write_text(json.dumps({"path": str(d), "created": str(value), "n": 4}))
    np.savez(d / "noise.npz", mask=np.array([True, False]))
    (d / "locks").mkdir()
    (d / "locks" / "x.lock").write_text(str(value))
    return d


def test_compare_ignores_clocks_paths_and_locks_only(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b", 1.0)
    (b / "manifest.json").write_text(json.dumps({"path": str(b), "created": "later", "n": 4}))
    assert compare(a, b) == []


def test_compare_names_every_kind_of_difference(tmp_path):
    a = _tree(tmp_path / "a")
    flipped = _tree(tmp_path / "flipped")
    raw = bytearray((flipped / "units" / "0.npy").read_bytes())
    raw[-1] ^= 1
    (flipped / "units" / "0.npy").write_bytes(bytes(raw))
    assert compare(a, flipped) == ["differs units/0.npy"]
    meta = _tree(tmp_path / "meta")
    (meta / "manifest.json").write_text(json.dumps({"path": str(meta), "created": "x", "n": 5}))
    assert compare(a, meta) == ["differs manifest.json"]
    gone = _tree(tmp_path / "gone")
    (gone / "noise.npz").unlink()
    (gone / "extra.bin").write_bytes(b"x")
    assert compare(a, gone) == ["missing noise.npz", "extra extra.bin"]
    mask = _tree(tmp_path / "mask")
    np.savez(mask / "noise.npz", mask=np.array([True, True]))
    assert compare(a, mask) == ["differs noise.npz"]


@pytest.mark.slow
def test_random_kills_of_every_command_resume_to_the_reference(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "fault_inject.py"), "--kills", "5",
                           "--seed", "3", "--work", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    m = re.search(r"faults injected: (\d+), survived: (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 4 and m.group(1) == m.group(2), proc.stdout[-3000:]
    assert proc.stdout.count("ok   ") == 5 and "FAIL" not in proc.stdout
