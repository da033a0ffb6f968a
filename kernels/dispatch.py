"""Backend dispatch: which implementation (Triton kernel or torch reference) serves a call.

The rule, decided per call from the tensors' device and logged once per outcome:

- ``auto`` (default): CUDA tensors in a kernel dtype (fp32/fp16/bf16) with Triton importable go to
  the Triton kernels; everything else (CPU tensors, float64, no Triton) to the torch reference.
- ``torch``: always the reference (debugging, bisecting a numerical difference).
- ``triton``: always the kernels; on CPU tensors this needs the Triton interpreter, i.e.
  ``TRITON_INTERPRET=1`` set before the kernels are first used, and raises
  :class:`~fastinf.errors.BackendError` otherwise.

The environment variable ``FASTINF_KERNELS`` (read once, at import) sets the process-wide choice; the
:func:`use_backend` context manager overrides it locally (tests). Importing this module does not import
Triton: the kernel modules are loaded by :func:`triton_module` on first use.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from fastinf.errors import BackendError, ConfigError
from fastinf.kernels._checks import KERNEL_DTYPES

__all__ = ["ENV_VAR", "BACKENDS", "use_backend", "requested_backend", "resolve", "triton_available",
           "triton_module"]

log = logging.getLogger("fastinf.kernels")

ENV_VAR = "FASTINF_KERNELS"
BACKENDS = ("auto", "torch", "triton")

_ENV_VALUE: str = os.environ.get(ENV_VAR, "auto")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastinf_kernels_backend", default=None)
_logged: set[tuple[str, str, str]] = set()


def _parse(value: str, source: str) -> str:
    name = value.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"{source}: expected one of {', '.join(BACKENDS)}, found {value!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ("auto", "torch" or "triton") inside a ``with`` block (tests, debugging)."""
    token = _override.set(_parse(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``FASTINF_KERNELS``, else "auto"."""
    forced = _override.get()
    return forced if forced is not None else _parse(_ENV_VALUE, f"environment variable {ENV_VAR}")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """"torch" or "triton" for a call on ``device`` whose floating inputs have ``dtypes``."""
    want = requested_backend()
    supported = all(d in KERNEL_DTYPES for d in dtypes)
    if want == "torch":
        choice = "torch"
    elif want == "auto":
        choice = "triton" if device.type == "cuda" and supported and triton_available() else "torch"
    else:
        forced = f"backend 'triton' (forced by {ENV_VAR} or use_backend)"
        if not triton_available():
            raise BackendError(f"{forced}: expected the triton package, found none; install it "
                               f"(pip install triton) or set {ENV_VAR}=torch")
        if not supported:
            bad = sorted({str(d) for d in dtypes if d not in KERNEL_DTYPES})
            raise BackendError(f"{forced}: the kernels read float32/float16/bfloat16, found {bad}; "
                               f"cast the inputs or set {ENV_VAR}=auto (which sends them to the torch reference)")
        if device.type == "cpu" and not _interpreter_runs_cpu():
            raise BackendError(f"{forced} on CPU tensors: expected the Triton interpreter "
                               f"(TRITON_INTERPRET=1 set before the kernels are first used), found it off; "
                               f"set it at the start of the process, move the tensors to CUDA, or set "
                               f"{ENV_VAR}=torch")
        if device.type not in ("cpu", "cuda"):
            raise BackendError(f"{forced}: expected CUDA (or CPU with the interpreter) tensors, "
                               f"found device {device}; set {ENV_VAR}=auto")
        choice = "triton"
    key = (want, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("kernels: backend %s requested, %s tensors -> %s path", want, device.type, choice)
    return choice


def _interpreter_runs_cpu() -> bool:
    """True if the kernels are (or, once loaded, will be) interpreted, so they accept CPU tensors."""
    if not _interpreter_requested():
        return False
    utils = importlib.import_module("fastinf.kernels._utils")
    return utils.INTERPRET


def triton_module(name: str) -> ModuleType:
    """Import the kernel module ``fastinf.kernels.<name>`` (this is where Triton gets imported)."""
    try:
        return importlib.import_module(f"fastinf.kernels.{name}")
    except ImportError as e:
        raise BackendError(f"could not load the Triton kernel module {name!r}: {e}; set {ENV_VAR}=torch "
                           f"to use the torch reference") from e
