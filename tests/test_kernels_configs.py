"""The autotuning tables: every (device, class) has configs, a call keeps only its class, and the kernels
compile for a real GPU target (sm_90) without spilling registers — checked on CPU with the ptxas that
ships in the Triton wheel, so CI without a GPU still catches what the interpreter lets through."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastinf.kernels import _utils

ARCHS = ("hopper", "ampere")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_class_has_configs(arch):
    table = _utils._PROJECTION_TABLE[arch]
    assert set(table) == {(s, p) for s in ("small", "big") for p in ("tf32", "x3")}
    assert set(_utils._LOWRANK_TABLE[arch]) == {"tf32", "x3"}
    for entries in list(table.values()) + list(_utils._LOWRANK_TABLE[arch].values()):
        assert entries and len(set(entries)) == len(entries)
        for a, b, warps, stages in entries:
            assert a >= 16 and b >= 16 and a & (a - 1) == 0 and b & (b - 1) == 0, "tl.dot needs pow2 dims >= 16"
            assert warps in (4, 8) and 1 <= stages <= 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,prec,klass", [(16, "tf32", ("small", "tf32")), (64, "tf32", ("big", "tf32")),
                                          (16, "tf32x3", ("small", "x3")), (32, "ieee", ("big", "x3"))])
def test_prune_keeps_the_call_class(monkeypatch, arch, k, prec, klass):
    monkeypatch.setattr(_utils, "_arch", lambda: arch)
    union = _utils._union(list(_utils._PROJECTION_TABLE[arch].values()), _utils._PROJ_NAMES)
    kept = _utils._prune_projection(union, {"D_IN": 4096, "D_OUT": 4096}, KI=k, KO=16, PREC=prec)
    assert [_utils._entry(c, _utils._PROJ_NAMES) for c in kept] == _utils._PROJECTION_TABLE[arch][klass]
    # a narrow layer drops feature chunks wider than its reductions, keeping at least one config
    narrow = _utils._prune_projection(union, {"D_IN": 20, "D_OUT": 30}, KI=k, KO=16, PREC=prec)
    assert narrow
    assert all(c.kwargs["BLOCK_D"] <= 32 for c in narrow) or len(narrow) == 1
    monkeypatch.setenv("FASTINF_TRITON_AUTOTUNE", "0")
    assert len(_utils._prune_projection(union, {"D_IN": 4096, "D_OUT": 4096}, KI=k, KO=16, PREC=prec)) == 1


def test_kernels_compile_for_hopper_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "fastinf.kernels.compile_check", "--arch", "hopper", "--first"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "10 kernels compiled, 0 with register spills" in res.stdout, res.stdout[-3000:]
