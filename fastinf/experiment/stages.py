"""The stage cache of ``fastinf run``: ``<stage>.done.json`` markers and the runner that consults them.

Every stage writes its outputs under ``<out>/seed-<s>/`` and a ``<stage>.done.json`` marker holding
the hash of what the stage depends on (its configuration ``deps`` and the hashes of the ``upstream``
stages' markers) plus its wall time. :meth:`StageRunner.stage` skips a stage whose marker matches and
otherwise runs it and writes the marker; chaining ``upstream`` hashes is what makes a change re-run a
stage *and everything after it*. Kept apart from the per-seed stages (:mod:`.seed_stages`) so the
caching rules can be read on their own.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fastinf.experiment.config import RunConfig, config_hash

__all__ = ["StageRunner"]

_DONE = ".done.json"


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


def _done_path(stage_dir: Path, name: str) -> Path:
    return stage_dir / f"{name}{_DONE}"


def _cached(stage_dir: Path, name: str, digest: str) -> dict[str, Any] | None:
    path = _done_path(stage_dir, name)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("hash") == digest else None


def _mark(stage_dir: Path, name: str, digest: str, seconds: float, run_hash: str, **info: Any) -> dict[str, Any]:
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker = {"stage": name, "hash": digest, "config_hash": run_hash, "seconds": seconds, **info}
    tmp = _done_path(stage_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str) + "\n")
    tmp.replace(_done_path(stage_dir, name))
    return marker


def _invalidate(stage_dir: Path, name: str) -> None:
    _done_path(stage_dir, name).unlink(missing_ok=True)


def marker_hash(stage_dir: Path, name: str) -> str | None:
    """The hash in stage ``name``'s marker (``None`` when it has none): the ``upstream`` of later stages."""
    p = _done_path(stage_dir, name)
    return json.loads(p.read_text())["hash"] if p.exists() else None


# ----------------------------------------------------------------------------------------------
# the runner


class StageRunner:
    """One ``fastinf run``'s settings (config, output directory, progress, echo) and its stage log."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool, echo: Callable[[str], None]) -> None:
        self.cfg, self.out, self.progress, self.echo = cfg, out, progress, echo
        self.run_hash = config_hash(cfg)
        self.ran: list[str] = []
        self.cached: list[str] = []

    # a stage: run ``fn`` unless its marker matches ``deps``; always returns the marker
    def stage(self, stage_dir: Path, name: str, deps: Any, fn: Callable[[], dict[str, Any]],
              upstream: Sequence[str] = ()) -> dict[str, Any]:
        digest = config_hash({"deps": deps, "upstream": list(upstream)})
        marker = _cached(stage_dir, name, digest)
        label = f"{stage_dir.name}/{name}"
        if marker is not None:
            self.cached.append(label)
            return marker
        t0 = time.perf_counter()
        info = fn() or {}
        self.ran.append(label)
        return _mark(stage_dir, name, digest, time.perf_counter() - t0, self.run_hash, **info)
