"""Fine-tuning of Hugging Face sequence classifiers, with the checkpoints influence estimation needs.

What it does (the paper's protocol): optionally wrap the model in peft LoRA adapters (the paper:
r=4, alpha=4 on ``query``/``value``, plus a fully trained classification head), train with AdamW and
a linear-warmup + cosine schedule, write one checkpoint per epoch together with the learning rate it
ran at (TracIn sums ``eta_c * grad_c . grad_c'`` over checkpoints), and select as *the* scored model
the checkpoint with the lowest loss on the held-out checkpoint-selection split (``heldout``; which split
that is: :mod:`fastinf.experiment.splits`). Options: ``lr: auto`` (a short seeded sweep over
``train.lr_sweep`` first, :mod:`fastinf.experiment.lr_auto`), early stopping (``train.patience``: stop after
that many epochs without a lower held-out loss; the best epoch's weights are restored and scored), full
fine-tuning (``lora: null``) or LoRA of any rank / target modules, and an ``evaluation`` split measured once
on the restored best weights (``TrainResult.evaluation``: loss, accuracy, predictions, labels).

Checkpoints (``fastinf.extraction.checkpoint``) store only the trainable tensors (LoRA adapters + head,
or everything for full fine-tuning) plus the recipe to rebuild the frozen rest, so a 22M-parameter
MiniLM costs ~100 KB per LoRA checkpoint. Epoch 0 (the initial
state) is saved too: filter-and-retrain restarts from it.

Determinism on CPU: the head initialisation, the LoRA initialisation, dropout and the data order are
all driven by the ``seed`` (data order by a private ``torch.Generator`` per epoch), so two runs with
the same seed produce bit-identical checkpoints.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from fastinf.experiment.config import ModelConfig, TrainConfig
from fastinf.extraction.checkpoint import (  # noqa: F401  (HEAD_NAMES .. resolve_model_path re-exported)
    HEAD_NAMES, build_model, load_checkpoint, resolve_model_path, save_checkpoint,
)
from fastinf.errors import DataError
from fastinf.experiment.rundir import open_output_dir

__all__ = [
    "TextSamples", "Checkpoint", "TrainResult", "build_model", "finetune", "load_checkpoint",
    "evaluate_model", "resolve_model_path", "lr_lambda", "epoch_batches", "HEAD_NAMES",
]

log = logging.getLogger(__name__)



class TextSamples(Protocol):
    """What training needs from a dataset (``fastinf.data.TextDataset`` satisfies it)."""

    texts: Sequence[str]
    text_pairs: Sequence[str] | None
    labels: Sequence[int]


# ----------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Checkpoint:
    """One saved epoch. ``lr`` is the learning rate at the end of the epoch, ``mean_lr`` its average."""

    epoch: int
    path: str
    lr: float
    mean_lr: float
    step: int
    train_loss: float | None
    heldout_loss: float | None
    heldout_acc: float | None


@dataclass
class TrainResult:
    """All checkpoints (epoch 0 = initial), the selected one, and the wall time of the fine-tune."""

    checkpoints: list[Checkpoint]
    best_epoch: int
    seconds: float
    out: str
    history: list[dict[str, float]] = field(default_factory=list)
    lr: float | None = None                      # the peak lr trained with (the choice of ``lr: auto``)
    stopped_epoch: int | None = None             # the epoch early stopping ended at (None: ran them all)
    evaluation: dict[str, Any] | None = None     # the best checkpoint on the evaluation split

    @property
    def best(self) -> Checkpoint:
        return next(c for c in self.checkpoints if c.epoch == self.best_epoch)

    @property
    def initial(self) -> Checkpoint:
        return self.checkpoints[0]

    def lr_log(self) -> list[dict[str, float]]:
        """Per-epoch learning rates (epochs >= 1), as written to ``lr_log.json`` (TracIn's ``eta_c``)."""
        return [{"epoch": c.epoch, "lr": c.lr, "mean_lr": c.mean_lr, "step": c.step, "path": c.path}
                for c in self.checkpoints if c.epoch > 0]

    def save(self) -> Path:
        path = Path(self.out) / "train.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        (Path(self.out) / "lr_log.json").write_text(json.dumps(self.lr_log(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, out: str | Path) -> "TrainResult":
        d = json.loads((Path(out) / "train.json").read_text())
        d["checkpoints"] = [Checkpoint(**c) for c in d["checkpoints"]]
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# data


def _encode(tokenizer: Any, data: TextSamples, max_length: int) -> list[dict[str, list[int]]]:
    pairs = getattr(data, "text_pairs", None)
    enc = tokenizer(list(data.texts), list(pairs) if pairs is not None else None,
                    truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(data.texts))]


def _collate(tokenizer: Any, rows: list[dict[str, list[int]]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad(rows, return_tensors="pt")
    batch = {k: v for k, v in batch.items()}
    batch["labels"] = labels
    return batch


def _labels_of(data: TextSamples) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(data.labels, dtype=np.int64))
    if y.ndim != 1 or y.numel() != len(data.texts):
        raise DataError(f"expected one label per text ({len(data.texts)}), got labels of shape {tuple(y.shape)}")
    return y


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer: Any, data: TextSamples, *, max_length: int,
                   batch_size: int = 64, return_predictions: bool = False) -> tuple:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data`` (eval mode, no dropout); with
    ``return_predictions`` also the predicted classes (a list of ints)."""
    was_training = model.training
    model.eval()
    rows, y = _encode(tokenizer, data, max_length), _labels_of(data)
    total, correct, preds = 0.0, 0, []
    for s in range(0, len(rows), batch_size):
        batch = _collate(tokenizer, rows[s:s + batch_size], y[s:s + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        preds += logits.argmax(-1).tolist()
    model.train(was_training)
    n = max(len(rows), 1)
    return (total / n, correct / n, preds) if return_predictions else (total / n, correct / n)


# ----------------------------------------------------------------------------------------------
# schedule and loop


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(n: int, batch_size: int, generator: torch.Generator,
                  lengths: np.ndarray | None = None, pool: int = 32) -> list[torch.Tensor]:
    """The batches (index tensors) of one epoch, determined by ``generator``.

    Without ``lengths``: a random permutation cut into batches. With ``lengths`` (group by length): the
    permutation is cut into pools of ``pool`` batches, each pool is sorted by length (so that a batch
    pads to similar lengths), and the batches are shuffled; every sample is still seen once per epoch.
    """
    order = torch.randperm(n, generator=generator)
    if lengths is None:
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    size = batch_size * pool
    chunks = []
    for s in range(0, n, size):
        part = order[s:s + size]
        chunks.append(part[torch.as_tensor(np.argsort(-lengths[part.numpy()], kind="stable"))])
    order = torch.cat(chunks)
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def finetune(model_cfg: ModelConfig, cfg: TrainConfig, train: TextSamples, heldout: TextSamples | None,
             out: str | Path, *, seed: int = 0, n_classes: int | None = None,
             progress: bool = False, evaluation: TextSamples | None = None) -> TrainResult:
    """Fine-tune ``model_cfg`` on ``train``; save epoch checkpoints under ``out``; select the best.

    Args:
        model_cfg: the pretrained model (name, max_length, dtype).
        cfg: optimiser, schedule, epochs, LoRA settings, checkpoint selection.
        train: the (possibly noisy) training samples.
        heldout: the checkpoint-selection split; its loss selects the scored checkpoint (``cfg.select ==
            "best"``), stops early (``cfg.patience``) and ranks ``lr: auto`` candidates (by accuracy).
        out: directory receiving ``ckpt-<epoch>/``, ``train.json`` and ``lr_log.json``.
        seed: drives every random choice (head/LoRA init, dropout, data order).
        n_classes: number of classes (default: ``max(label) + 1`` over train and heldout).
        evaluation: an evaluation split, measured on the best weights (``result.evaluation``).

    Returns:
        a :class:`TrainResult`; ``result.best.path`` is the checkpoint to extract from.
    """
    t0 = time.perf_counter()
    out = Path(out)
    y = _labels_of(train)
    n_classes = _check_classes(y, heldout, n_classes)
    with open_output_dir(out, "train"):       # new, empty or a train directory fastinf wrote; locked
        if cfg.lr == "auto":
            from fastinf.experiment.lr_auto import choose_lr

            lr = choose_lr(model_cfg, cfg, train, heldout, out, seed=seed, n_classes=n_classes,
                           run=lambda c: _sweep_one(model_cfg, c, train, y, heldout, seed, n_classes))
            cfg = replace(cfg, lr=lr)
        result = _finetune(model_cfg, cfg, train, y, heldout, out, seed=seed, n_classes=n_classes,
                           progress=progress, t0=t0, evaluation=evaluation)
        result.save()
        return result


def _sweep_one(model_cfg: ModelConfig, cfg: TrainConfig, train: TextSamples, y: torch.Tensor,
               heldout: TextSamples, seed: int, n_classes: int) -> tuple[float, float]:
    """Train one ``lr: auto`` candidate on its short budget (nothing saved); its held-out (loss, accuracy)."""
    fit = _setup(model_cfg, cfg, train, y, heldout, seed=seed, n_classes=n_classes)
    fit.model.train()
    lengths = np.array([len(r["input_ids"]) for r in fit.rows]) if cfg.group_by_length else None
    for epoch in range(1, cfg.epochs + 1):
        _train_epoch(fit, cfg, epoch, seed, lengths, False)
    return _held(fit)


def _finetune(model_cfg: ModelConfig, cfg: TrainConfig, train: TextSamples, y: torch.Tensor,
              heldout: TextSamples | None, out: Path, *, seed: int, n_classes: int, progress: bool,
              t0: float, evaluation: TextSamples | None = None) -> TrainResult:
    """The body of :func:`finetune` inside its locked output directory: epoch 0, the epochs (stopping early
    after ``cfg.patience`` epochs without a lower held-out loss), selection, the evaluation split."""
    fit = _setup(model_cfg, cfg, train, y, heldout, seed=seed, n_classes=n_classes)
    h_loss, h_acc = _held(fit)
    checkpoints = [_save(fit, Checkpoint(epoch=0, path=str(out / "ckpt-0"), lr=0.0, mean_lr=0.0, step=0,
                                         train_loss=None, heldout_loss=h_loss, heldout_acc=h_acc))]
    history: list[dict[str, float]] = []
    fit.model.train()
    lengths = np.array([len(r["input_ids"]) for r in fit.rows])
    stop = _EarlyStop(cfg.patience if heldout is not None else None)
    for epoch in range(1, cfg.epochs + 1):
        lrs, losses = _train_epoch(fit, cfg, epoch, seed, lengths if cfg.group_by_length else None, progress)
        h_loss, h_acc = _held(fit)
        ck = _save(fit, Checkpoint(epoch=epoch, path=str(out / f"ckpt-{epoch}"), lr=float(lrs[-1]),
                                   mean_lr=float(np.mean(lrs)), step=fit.step, train_loss=float(np.mean(losses)),
                                   heldout_loss=h_loss, heldout_acc=h_acc))
        checkpoints.append(ck)
        history.append({"epoch": epoch, "train_loss": ck.train_loss, "heldout_loss": h_loss, "heldout_acc": h_acc})
        log.info("epoch %d: train loss %.4f, held-out loss %s, acc %s", epoch, ck.train_loss, h_loss, h_acc)
        fit.model.train()
        if stop.update(h_loss):
            break
    best_epoch = _select(checkpoints[1:], cfg, heldout)
    return TrainResult(checkpoints=checkpoints, best_epoch=best_epoch, seconds=time.perf_counter() - t0,
                       out=str(out), history=history, lr=float(cfg.lr),
                       stopped_epoch=checkpoints[-1].epoch if stop.stopped else None,
                       evaluation=_evaluate_best(fit, checkpoints, best_epoch, evaluation))


class _EarlyStop:
    """Patience on the held-out loss: ``update`` returns True when ``patience`` epochs in a row did not lower
    it. ``patience=None``: never stops."""

    def __init__(self, patience: int | None) -> None:
        self.patience, self.best, self.since, self.stopped = patience, math.inf, 0, False

    def update(self, loss: float | None) -> bool:
        if self.patience is None or loss is None:
            return False
        self.best, self.since = (loss, 0) if loss < self.best else (self.best, self.since + 1)
        self.stopped = self.since >= self.patience
        return self.stopped


def _evaluate_best(fit: _Fit, checkpoints: list[Checkpoint], best_epoch: int,
                   evaluation: TextSamples | None) -> dict[str, Any] | None:
    """Restore the best epoch's trainable tensors into the model and measure it on ``evaluation``: loss,
    accuracy, predictions and labels (what learned-or-refuse's tests need)."""
    if evaluation is None:
        return None
    from safetensors.torch import load_file

    best = next(c for c in checkpoints if c.epoch == best_epoch)
    state = load_file(str(Path(best.path) / "trainable.safetensors"))
    missing = set(state) - set(fit.model.state_dict())
    if missing:
        raise DataError(f"checkpoint {best.path} does not fit the model (e.g. {sorted(missing)[0]}); retrain")
    fit.model.load_state_dict(state, strict=False)
    loss, acc, pred = evaluate_model(fit.model, fit.tokenizer, evaluation, max_length=fit.max_length,
                                     return_predictions=True)
    return {"epoch": best_epoch, "loss": loss, "acc": acc, "n": len(pred), "predictions": pred,
            "labels": [int(v) for v in _labels_of(evaluation).tolist()]}


@dataclass
class _Fit:
    """What the epochs of one fine-tune share: the model, its encoded data, optimiser and schedule."""

    model: nn.Module
    tokenizer: Any
    rows: list[dict[str, list[int]]]
    y: torch.Tensor
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    heldout: TextSamples | None
    max_length: int
    meta_base: dict[str, Any]
    step: int = 0


def _check_classes(y: torch.Tensor, heldout: TextSamples | None, n_classes: int | None) -> int:
    """The number of classes (given, or observed over train and heldout); refuse empty / one-class training."""
    if y.numel() == 0:
        raise DataError("the training set is empty")
    observed = int(y.max()) + 1 if heldout is None else max(int(y.max()), int(_labels_of(heldout).max())) + 1
    n_classes = n_classes or observed
    if torch.unique(y).numel() < 2:
        raise DataError(f"the training set has a single class ({int(y[0])}); a classifier cannot be trained. "
                        "Check the label column or use a larger / stratified sample.")
    return n_classes


def _setup(model_cfg: ModelConfig, cfg: TrainConfig, train: TextSamples, y: torch.Tensor,
           heldout: TextSamples | None, *, seed: int, n_classes: int) -> _Fit:
    """Build the (seeded) model, encode the training texts, make AdamW and the warmup + decay schedule."""
    model, tokenizer = build_model(model_cfg, n_classes, cfg.lora, seed=seed)
    meta_base = {"model": asdict(model_cfg), "lora": asdict(cfg.lora) if cfg.lora else None,
                 "n_classes": n_classes, "seed": seed}
    rows = _encode(tokenizer, train, model_cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warmup, cfg.schedule))
    return _Fit(model=model, tokenizer=tokenizer, rows=rows, y=y, params=params, opt=opt, sched=sched,
                heldout=heldout, max_length=model_cfg.max_length, meta_base=meta_base)


def _held(fit: _Fit) -> tuple[float | None, float | None]:
    """Held-out (loss, accuracy), or (None, None) without a held-out set."""
    if fit.heldout is None:
        return None, None
    return evaluate_model(fit.model, fit.tokenizer, fit.heldout, max_length=fit.max_length)


def _save(fit: _Fit, ck: Checkpoint) -> Checkpoint:
    """Write the checkpoint ``ck`` describes (trainable tensors + its metadata); returns ``ck``."""
    save_checkpoint(fit.model, Path(ck.path), {**fit.meta_base, **asdict(ck)})
    return ck


def _train_epoch(fit: _Fit, cfg: TrainConfig, epoch: int, seed: int, lengths: np.ndarray | None,
                 progress: bool) -> tuple[list[float], list[float]]:
    """One epoch of optimizer steps in the seeded batch order; returns the per-step lrs and losses."""
    batches = epoch_batches(len(fit.rows), cfg.batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch),
                            lengths)
    lrs, losses = [], []
    it = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc=f"train epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
    for idx in it:
        batch = _collate(fit.tokenizer, [fit.rows[i] for i in idx.tolist()], fit.y[idx])
        labels = batch.pop("labels")
        logits = fit.model(**batch).logits.float()
        loss = nn.functional.cross_entropy(logits, labels)
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(fit.params, cfg.max_grad_norm)
        lrs.append(fit.opt.param_groups[0]["lr"])
        fit.opt.step()
        fit.sched.step()
        fit.step += 1
        losses.append(loss.item())
    return lrs, losses


def _select(trained: list[Checkpoint], cfg: TrainConfig, heldout: TextSamples | None) -> int:
    """The scored epoch: lowest held-out loss (``select == "best"`` with a held-out set), else the last."""
    if cfg.select == "best" and heldout is not None:
        return min(trained, key=lambda c: (c.heldout_loss, c.epoch)).epoch
    return trained[-1].epoch
