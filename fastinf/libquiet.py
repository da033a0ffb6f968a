"""Scoped quieting of the ML libraries' console noise (transformers logging, load reports, progress bars,
known FutureWarning / UserWarning / DeprecationWarning), restored on exit.

A foundation module (imports nothing heavy, nothing of fastinf) so that both the CLI
(:mod:`fastinf.cli.console`, around every command) and model loading (``fastinf.load_model``, around its
``from_pretrained``) use it; a program that imports fastinf as a library keeps its own logging and warning
settings outside fastinf's calls.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator

__all__ = ["quiet_libraries", "NOISY_MODULES"]

NOISY_MODULES = r"(transformers|peft|torch|accelerate|huggingface_hub|datasets|tokenizers|safetensors)(\.|$)"
_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_LOADER_LOGGER = "transformers.modeling_utils"
_MISSING = re.compile(r"^(\S+)\s*\|\s*\S*MISSING", re.M)
log = logging.getLogger("fastinf")


class _LoadReportFilter(logging.Filter):
    """Drops the transformers loading report (and other sub-error records of its loader); a report that names
    newly initialised (MISSING) weights becomes one fastinf line when ``notice`` is set."""

    def __init__(self, notice: bool) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" in msg and self.notice:
            missing = _MISSING.findall(re.sub(r"\x1b\[[0-9;]*m", "", msg))
            if missing:
                log.warning("%d weight(s) not in the checkpoint, newly initialised from the seeded RNG "
                            "(a new classification head): %s", len(missing), ", ".join(sorted(missing)[:4]))
        return record.levelno >= logging.ERROR and "LOAD REPORT" not in msg


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False, *, notice: bool = True) -> Iterator[None]:
    """Within the body: library logging, progress bars and known warnings kept quiet (see the module docstring).

    ``notice``: replace a loading report that lists newly initialised weights by one fastinf line (callers that
    report the new head themselves, like ``load_model``, pass False)."""
    if verbose:
        yield
        return
    env = {} if "transformers.utils.logging" in sys.modules else _ENV   # (imported in the body: its defaults)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    loader = logging.getLogger(_LOADER_LOGGER)
    filt, level = _LoadReportFilter(notice), loader.level
    loader.addFilter(filt)
    loader.setLevel(logging.WARNING)     # records are made (so the filter sees the report), never shown
    tf_state = _transformers_quiet()
    with warnings.catch_warnings():
        for cat in (FutureWarning, UserWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=cat, module=NOISY_MODULES)
        try:
            yield
        finally:
            loader.removeFilter(filt)
            loader.setLevel(level)
            for k, v in saved_env.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            _transformers_restore(tf_state)


def _transformers_quiet() -> tuple[int, bool] | None:
    """Set an already imported transformers to error logging without progress bars; its previous state.
    (Not yet imported: the environment set for the body configures it when it is imported.)"""
    tl = sys.modules.get("transformers.utils.logging")
    if tl is None:
        return None
    state = (tl.get_verbosity(), tl.is_progress_bar_enabled())
    tl.set_verbosity(logging.ERROR)
    tl.disable_progress_bar()
    return state


def _transformers_restore(state: tuple[int, bool] | None) -> None:
    """Give transformers back its verbosity and progress bars (its defaults when it was imported in the body)."""
    tl = sys.modules.get("transformers.utils.logging")
    if tl is None:
        return
    verbosity, bars = state if state is not None else (tl._get_default_logging_level(), True)
    tl.set_verbosity(verbosity)
    if bars:
        tl.enable_progress_bar()     # (a no-op, warned about and ignored here, when the hub disabled them)
