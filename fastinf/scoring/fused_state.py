"""Crash-safe resume of a fused influence run: the accumulators committed after finished tasks.

A run with an output file ``agg.parquet`` commits its state to ``.agg.parquet.fused-state.npz`` beside it
after a finished task (one unit of one test-block set) once ``commit_s`` seconds have passed since the last
commit (0: after every task): every atom's running sums, the number of finished tasks, the top-k rows so far
and the *request key* (a hash of everything that determines the result: stores, method, options, groups,
blocks). The file is written to a temporary name, fsynced and renamed, so a SIGKILL leaves the previous
commit or the new one, never a torn file. ``resume=True`` loads it (refusing a different request) and runs
the remaining tasks; the float sums continue in the same order, so the result is the uninterrupted run's bit
for bit. The state file is removed once the outputs are written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError, StoreMismatchError
from fastinf.store.durable import fsync_dir

__all__ = ["state_path", "request_key", "save_state", "load_state", "MARK"]

MARK = "fastinf-fused-state-v1"
_FIELDS = ("sum", "zsum", "rank2", "vote2", "min2", "rrf")


def state_path(out: str | Path) -> Path:
    """Where the resume state of the run writing ``out`` lives (hidden, beside it)."""
    p = Path(out)
    return p.with_name(f".{p.name}.fused-state.npz")


def request_key(run: Any, request: dict[str, Any]) -> str:
    """SHA-256 of the request: stores (fingerprints), method and options, groups, tasks' blocks."""
    plan = run.plan
    key = {**request, "stores": [[t.test.fingerprint, t.train.fingerprint, t.weight] for t in plan.terms],
           "units": [u.name for u in plan.units], "groups": run.group_idx, "test_rows": plan.test_rows,
           "set_blocks": run.set_blocks, "by_set": run.topk is not None, "hows": run.hows}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def save_state(path: Path, key: str, done: int, run: Any, topk_rows: list[dict[str, Any]] | None) -> None:
    """Commit the accumulators after ``done`` finished tasks (temp file + fsync + rename)."""
    arrays: dict[str, Any] = {"mark": np.array(MARK), "key": np.array(key), "done": np.array(done, np.int64)}
    for i, acc in enumerate(run.atoms):
        arrays[f"a{i}.rankers"] = np.array(acc.rankers, np.int64)
        for f in _FIELDS:
            if getattr(acc, f) is not None:
                arrays[f"a{i}.{f}"] = getattr(acc, f)
    if topk_rows is not None:
        arrays["topk"] = np.array(json.dumps([{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                               for k, v in r.items()} for r in topk_rows]))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise StoreError(f"cannot commit the resume state {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path, key: str, run: Any) -> tuple[int, list[dict[str, Any]] | None]:
    """Load a committed state into ``run.atoms``; returns (finished tasks, top-k rows or None)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise StoreError(f"{path}: the resume state is damaged ({type(e).__name__}); delete it and run again "
                         "without --resume") from None
    if str(data.get("mark", "")) != MARK:
        raise StoreError(f"{path}: not a fastinf fused-run state; move it away")
    if str(data["key"]) != key:
        raise StoreMismatchError(f"{path}: the interrupted run was a different request (other stores, method, "
                                 "options or groups); rerun it as it was, or use --overwrite to start over")
    for i, acc in enumerate(run.atoms):
        acc.rankers = int(data[f"a{i}.rankers"])
        for f in _FIELDS:
            if getattr(acc, f) is not None:
                getattr(acc, f)[:] = data[f"a{i}.{f}"]
    rows = None
    if "topk" in data:
        rows = [{k: (np.asarray(v, _DTYPES[k]) if k in _DTYPES else v) for k, v in r.items()}
                for r in json.loads(str(data["topk"]))]
    return int(data["done"]), rows


_DTYPES = {"test": np.int64, "position": np.int32, "train": np.int64, "score": np.float64}


def prepare_state(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a leftover state without ``resume`` / ``overwrite`` (an interrupted run is never silently
    restarted); ``overwrite`` removes it (a file fastinf recognises as its own state)."""
    if not path.exists():
        if resume:
            raise ConfigError(f"nothing to resume: {path} (the state of an interrupted run) does not exist")
        return
    if resume:
        return
    if not overwrite:
        raise ConfigError(f"an interrupted run left {path}; continue it with resume=True (--resume) or start "
                          "over with overwrite=True (--overwrite)")
    try:
        with np.load(path, allow_pickle=False) as z:
            own = "mark" in z.files and str(z["mark"]) == MARK
    except (OSError, ValueError, EOFError):
        own = False
    if not own:
        raise ConfigError(f"{path} is not a fastinf fused-run state; not removing it (move it away)")
    path.unlink()
