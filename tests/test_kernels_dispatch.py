"""Backend dispatch: CPU tensors take the torch reference, the override switches work, impossible
requests fail with a BackendError that says what to do, and ``import fastinf`` never imports Triton."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastinf.kernels as K
from fastinf.errors import BackendError, ConfigError
from fastinf.kernels import dispatch


def _kron_args():
    return (torch.randn(2, 3, 4), torch.randn(2, 3, 5), None, torch.randn(16, 5), torch.randn(16, 5))


def test_auto_sends_cpu_tensors_to_the_reference():
    with K.use_backend("auto"):
        assert dispatch.resolve(torch.device("cpu"), (torch.float32,)) == "torch"
        x = torch.randn(1, 2, 3)
        assert K.backend_for(x) == "torch"


def test_auto_sends_float64_to_the_reference_and_forced_triton_refuses_it():
    with K.use_backend("auto"):
        assert dispatch.resolve(torch.device("cuda"), (torch.float64,)) == "torch"
    with K.use_backend("triton"), pytest.raises(BackendError, match="float32/float16/bfloat16"):
        dispatch.resolve(torch.device("cpu"), (torch.float64,))


def test_use_backend_nests_and_restores():
    outer = dispatch.requested_backend()
    with K.use_backend("torch"):
        assert dispatch.requested_backend() == "torch"
        with K.use_backend("triton"):
            assert dispatch.requested_backend() == "triton"
        assert dispatch.requested_backend() == "torch"
    assert dispatch.requested_backend() == outer


def test_unknown_backend_name_is_a_config_error():
    with pytest.raises(ConfigError, match="expected one of auto, torch, triton, found 'cuda'"):
        with K.use_backend("cuda"):
            pass


def test_forced_torch_and_forced_triton_agree_on_cpu():
    # conftest sets TRITON_INTERPRET=1, so forcing Triton on CPU tensors runs the interpreted kernel
    args = _kron_args()
    with K.use_backend("torch"):
        a = K.kron_project(*args, bias=True)
    with K.use_backend("triton"):
        b = K.kron_project(*args, bias=True)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


_SUBPROCESS = textwrap.dedent("""
    import sys, torch
    import fastinf
    assert "triton" not in sys.modules, "import fastinf imported triton"
    import fastinf.kernels as K
    assert "triton" not in sys.modules, "import fastinf.kernels imported triton"
    x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    out = K.kron_project(x, g, None, torch.randn(16, 4), torch.randn(16, 5), bias=False)
    assert "triton" not in sys.modules, "a CPU call on the auto path imported triton"
    try:
        with K.use_backend("triton"):
            K.kron_project(x, g, None, torch.randn(16, 4), torch.randn(16, 5), bias=False)
    except fastinf.errors.BackendError as e:
        assert "TRITON_INTERPRET=1" in str(e), str(e)
        print("OK")
    else:
        raise SystemExit("forced triton on CPU without the interpreter did not raise")
""")


def test_import_is_triton_free_and_cpu_triton_needs_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTINF_KERNELS")}
    res = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_environment_variable_selects_the_backend():
    code = "import fastinf.kernels.dispatch as d; print(d.requested_backend())"
    env = dict(os.environ, FASTINF_KERNELS="torch")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "torch", res.stderr[-2000:]
