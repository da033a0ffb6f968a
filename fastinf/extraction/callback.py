"""Training-time capture: gradient stores of chosen data at chosen checkpoints, written while training runs.

``CheckpointCapture(out, tokenizer, train=..., test=..., every=k | steps=[...] | at_epochs=True)`` is the
plain-loop hook: call ``cap.step(model, optimizer, step)`` after each optimiser step (and
``cap.epoch_end(model, optimizer, step, epoch)`` at epoch ends); at a chosen checkpoint it runs
``fastinf.extract`` on the model's current weights for each split into ``out/step-<n>/<split>`` and records
the optimiser's learning rate in ``out/capture.json`` (:mod:`fastinf.extraction.capture_dir`).
``StoreCallback(...)`` is the same as a ``transformers.TrainerCallback`` (``Trainer(callbacks=[cb])``).

The stores are the ones ``fastinf.extract`` writes from the saved weights afterwards (same extraction code;
pass ``batch_size`` to fix it, or the automatic one of the same model is used). The capture leaves training
untouched: per-module train/eval modes are restored, the torch RNG states (CPU and CUDA) are forked so that
dropout and data order after the capture are what they would have been without it, and extraction writes
no ``.grad`` and no optimiser state. TracIn over the checkpoints is then
``fastinf.score(None, None, "tracin", checkpoints=out)``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from transformers import TrainerCallback

from fastinf.errors import ConfigError
from fastinf.extraction.capture_dir import (CAPTURE_KIND, new_manifest, read_capture, step_dir_name,
                                            write_capture)

__all__ = ["CheckpointCapture", "StoreCallback", "learning_rate"]

log = logging.getLogger(__name__)

_SETTINGS = ("layers", "proj", "task", "dtype", "batch_size", "max_length", "seed", "token_grads")


def learning_rate(optimizer_or_lr: Any) -> tuple[float, list[float]]:
    """``(lr, per-group lrs)`` of an optimiser (its first param group's lr) or of a plain number."""
    if isinstance(optimizer_or_lr, (int, float)) and not isinstance(optimizer_or_lr, bool):
        return float(optimizer_or_lr), [float(optimizer_or_lr)]
    groups = getattr(optimizer_or_lr, "param_groups", None)
    if not groups:
        raise ConfigError(f"expected an optimizer (with param_groups) or a learning rate number; got "
                          f"{type(optimizer_or_lr).__name__}")
    lrs = [float(g["lr"]) for g in groups]
    if len(set(lrs)) > 1:
        log.warning("param groups have different learning rates %s; the capture records the first as lr", lrs)
    return lrs[0], lrs


@contextlib.contextmanager
def training_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with the model's train/eval modes, ``.grad`` tensors and torch RNG states restored after."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, g in grads:
            p.grad = g


class CheckpointCapture:
    """Write fastinf stores of ``train`` and/or ``test`` at chosen checkpoints of a training loop.

    Args:
        out: capture directory (new, empty, or an earlier capture with the same settings: steps already
            recorded are skipped; ``overwrite=True`` clears a capture fastinf wrote, nothing else).
        tokenizer: the model's tokenizer. train, test: datasets (anything ``fastinf.extract`` accepts).
        every: capture every ``every`` optimiser steps. steps: explicit steps. at_epochs: at epoch ends.
        layers, proj, task, dtype, batch_size, max_length, seed, token_grads, device, model_name: as in
            ``fastinf.extract`` (``batch_size``: fix it for stores byte-identical to a later extraction).
    """

    def __init__(self, out: str | Path, tokenizer: Any, *, train: Any = None, test: Any = None,
                 every: int | None = None, steps: Sequence[int] | None = None, at_epochs: bool = False,
                 layers: Any = "all", proj: Any = "16x16", task: Any = "seq-cls", dtype: str = "fp16",
                 batch_size: int | None = None, max_length: int = 128, seed: int = 0, token_grads: bool = False,
                 device: Any = None, model_name: str | None = None, overwrite: bool = False,
                 progress: bool = False) -> None:
        self.out, self.tokenizer = Path(out), tokenizer
        self.data = {k: v for k, v in (("train", train), ("test", test)) if v is not None}
        self.every, self.steps, self.at_epochs = every, frozenset(int(s) for s in steps or ()), bool(at_epochs)
        _check_schedule(self.data, every, self.steps, self.at_epochs)
        self.settings = {"layers": layers, "proj": proj if isinstance(proj, str) else repr(proj),
                         "task": task if isinstance(task, str) else repr(task), "dtype": dtype,
                         "batch_size": batch_size, "max_length": max_length, "seed": seed,
                         "token_grads": token_grads, "splits": sorted(self.data)}
        self._extract_kw = dict(layers=layers, proj=proj, task=task, dtype=dtype, batch_size=batch_size,
                                max_length=max_length, seed=seed, token_grads=token_grads, device=device,
                                model_name=model_name, progress=progress)
        self.manifest = self._open(overwrite)

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """The finished checkpoints (step, epoch, lr, stores), in capture order."""
        return list(self.manifest["checkpoints"])

    def wants(self, step: int) -> bool:
        """Whether optimiser step ``step`` is a chosen checkpoint (``every`` / ``steps``)."""
        return step in self.steps or (self.every is not None and step > 0 and step % self.every == 0)

    def step(self, model: torch.nn.Module, optimizer_or_lr: Any, step: int) -> Path | None:
        """After optimiser step ``step``: capture if it is a chosen checkpoint; the step directory or None."""
        return self.capture(model, optimizer_or_lr, step) if self.wants(step) else None

    def epoch_end(self, model: torch.nn.Module, optimizer_or_lr: Any, step: int, epoch: float) -> Path | None:
        """At the end of an epoch (after optimiser step ``step``): capture if ``at_epochs``."""
        return self.capture(model, optimizer_or_lr, step, epoch=epoch) if self.at_epochs else None

    def capture(self, model: torch.nn.Module, optimizer_or_lr: Any, step: int,
                epoch: float | None = None) -> Path:
        """Write the stores of every split for the current weights (once per step) and record the lr."""
        from fastinf.extraction.fingerprint import model_fingerprint

        lr, lrs = learning_rate(optimizer_or_lr)
        sdir = self.out / step_dir_name(step)
        if any(int(c["step"]) == int(step) for c in self.manifest["checkpoints"]):
            return sdir                                   # captured already (an epoch end on an `every` step)
        with training_state_kept(model):
            for split, ds in self.data.items():
                self._extract(model, ds, sdir / split)
            fingerprint = model_fingerprint(model)["fingerprint"]
        self.manifest["checkpoints"].append(
            {"step": int(step), "epoch": None if epoch is None else float(epoch), "lr": lr, "lrs": lrs,
             "dir": sdir.name, "stores": {s: f"{sdir.name}/{s}" for s in self.data}, "fingerprint": fingerprint})
        write_capture(self.out, self.manifest)
        log.info("capture: step %d (lr %.3g) -> %s", step, lr, sdir)
        return sdir

    def _extract(self, model: torch.nn.Module, ds: Any, path: Path) -> None:
        """One split's store; an unrecorded store left by an interrupted capture is replaced."""
        from fastinf.extraction.extract import extract
        from fastinf.store.ownership import make_output_dir

        make_output_dir(path.parent)
        extract(model, self.tokenizer, ds, path, overwrite=True, **self._extract_kw)

    def _open(self, overwrite: bool) -> dict[str, Any]:
        """The capture index: a new one, or the earlier capture's (same settings) to continue."""
        from fastinf.store.ownership import check_removable, make_output_dir, remove_own_artifact

        check_removable(self.out, CAPTURE_KIND, what="the capture's out")   # refuses a foreign directory
        if overwrite:
            remove_own_artifact(self.out, CAPTURE_KIND, what="overwrite=True")
        make_output_dir(self.out)
        if not (self.out / CAPTURE_KIND.marker).is_file():
            manifest = new_manifest(self.settings)
            write_capture(self.out, manifest)
            return manifest
        manifest = read_capture(self.out)
        if manifest.get("settings") != self.settings:
            diff = next(k for k in self.settings if manifest.get("settings", {}).get(k) != self.settings[k])
            raise ConfigError(f"{self.out} holds a capture with other settings ({diff}: "
                              f"{manifest.get('settings', {}).get(diff)!r} there, {self.settings[diff]!r} now); "
                              "pass overwrite=True or choose another out")
        return manifest


def _check_schedule(data: dict[str, Any], every: int | None, steps: frozenset[int], at_epochs: bool) -> None:
    """Refuse a capture with no data or no checkpoint schedule (before any file is written)."""
    if not data:
        raise ConfigError("CheckpointCapture needs train= and/or test= data to extract at each checkpoint")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"every must be a positive number of optimiser steps; got {every!r}")
    if any(s < 0 for s in steps):
        raise ConfigError(f"steps must be non-negative optimiser steps; got {sorted(steps)}")
    if every is None and not steps and not at_epochs:
        raise ConfigError("choose the checkpoints: every=K steps, steps=[...] and/or at_epochs=True")


class StoreCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that captures stores at chosen checkpoints (see CheckpointCapture).

    ``StoreCallback(out, tokenizer, train=..., test=..., every=50)``; the Trainer's ``global_step`` is the
    step; the lr is the optimiser's at the checkpoint. Arguments are those of :class:`CheckpointCapture`.
    """

    def __init__(self, out: str | Path, tokenizer: Any, **kwargs: Any) -> None:
        self.capture = CheckpointCapture(out, tokenizer, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if model is not None and self.capture.wants(state.global_step):
            self.capture.capture(model, optimizer, state.global_step, epoch=state.epoch)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                     **kwargs: Any) -> None:
        if model is not None:
            self.capture.epoch_end(model, optimizer, state.global_step, state.epoch)
