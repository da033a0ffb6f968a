"""Capture directories: the gradient stores written *during* training, one set per checkpoint, with its lr.

``fastinf.CheckpointCapture`` / ``fastinf.StoreCallback`` (:mod:`fastinf.extraction.callback`) write::

    capture.json          the marker and index: {"kind": "fastinf capture", "format": 1, "settings": {...},
                          "checkpoints": [{"step", "epoch", "lr", "lrs", "dir", "stores": {split: rel path},
                          "fingerprint"}, ...]}   (rewritten by atomic rename after each finished checkpoint)
    step-<8 digits>/      one directory per checkpoint: ``train/`` and/or ``test/`` GradientStores

A checkpoint is listed in ``capture.json`` only after all its stores are finished, so a crash leaves either
the previous index or the new one. Each store is an ordinary store (byte-compatible with ``fastinf.extract``
on the saved weights). ``lr`` is the learning rate the optimiser holds at the checkpoint; TracIn over the
checkpoints, ``Σ_c lr_c ⟨g_test,c, g_train,c⟩``, reads its terms with :func:`capture_checkpoints`
(``fastinf.score(None, None, "tracin", checkpoints=DIR)``, ``fastinf score --method tracin --capture DIR``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fastinf.errors import ConfigError, StoreError
from fastinf.store.ownership import ArtifactKind

__all__ = ["CAPTURE_MARKER", "CAPTURE_KIND", "step_dir_name", "is_capture_dir", "read_capture",
           "write_capture", "capture_checkpoints"]

CAPTURE_MARKER = "capture.json"
_KIND = "fastinf capture"
_STEP = re.compile(r"^step-\d+$")
_TMP = re.compile(r"^capture\.json\.\d+\.tmp$")


def _is_entry(name: str) -> bool:
    return name == CAPTURE_MARKER or bool(_STEP.match(name)) or bool(_TMP.match(name)) or name == "locks"


CAPTURE_KIND = ArtifactKind("fastinf capture directory", CAPTURE_MARKER, entries=_is_entry,
                            is_own=lambda m: m.get("kind") == _KIND)


def step_dir_name(step: int) -> str:
    """``step-00000012``: the directory of the checkpoint at optimiser step ``step``."""
    return f"step-{int(step):08d}"


def is_capture_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a capture index (``capture.json``)."""
    return (Path(path) / CAPTURE_MARKER).is_file()


def new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    """The index of an empty capture with the given extraction ``settings``."""
    return {"kind": _KIND, "format": 1, "settings": settings, "checkpoints": []}


def read_capture(path: str | Path) -> dict[str, Any]:
    """The validated index of the capture directory ``path``; StoreError naming the problem otherwise."""
    f = Path(path) / CAPTURE_MARKER
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} is not a capture directory (no {CAPTURE_MARKER}); pass the `out` of a "
                         "fastinf.StoreCallback / CheckpointCapture") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{f} is damaged ({type(e).__name__}); capture the checkpoints again") from e
    if not isinstance(m, dict) or m.get("kind") != _KIND or not isinstance(m.get("checkpoints"), list):
        raise StoreError(f"{f} is not a fastinf capture index (kind {_KIND!r}); capture the checkpoints again")
    return m


def write_capture(path: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the index atomically (temp file + fsync + rename)."""
    from fastinf.store.durable import atomic_write_json

    atomic_write_json(Path(path) / CAPTURE_MARKER, manifest)


def capture_checkpoints(path: str | Path, *, test_split: str = "test", train_split: str = "train"
                        ) -> list[tuple[Path, Path, float]]:
    """``[(test_store, train_store, lr), ...]`` in step order: TracIn's terms from a capture directory."""
    root = Path(path)
    m = read_capture(root)
    out = []
    for ck in m["checkpoints"]:
        stores = ck.get("stores", {})
        missing = [s for s in (test_split, train_split) if s not in stores]
        if missing:
            raise ConfigError(f"capture {root} step {ck.get('step')} has no {missing[0]!r} store (it holds "
                              f"{sorted(stores)}); capture both the train and the test data for tracin")
        lr = float(ck["lr"])
        if not math.isfinite(lr):
            raise StoreError(f"capture {root} step {ck.get('step')} records a non-finite lr {lr}")
        out.append((root / stores[test_split], root / stores[train_split], lr))
    if not out:
        raise StoreError(f"capture {root} holds no finished checkpoint yet; train with the callback first")
    return out
