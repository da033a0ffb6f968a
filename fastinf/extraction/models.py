"""Models and tasks: load a Hugging Face model (with its tokenizer) and define the per-sample loss.

A *task* turns a model and a batch (a dict of tensors: ``input_ids``, ``attention_mask``, ``labels``,
optionally ``token_type_ids``) into one loss per sample, ``ℓ_n``; capture differentiates ``Σ_n ℓ_n``.
Because each ``ℓ_n`` depends only on sample ``n`` (models run in eval mode, padding is masked),
``∂(Σ ℓ)/∂y_n = ∂ℓ_n/∂y_n``: per-sample output gradients from one backward pass.

* ``SequenceClassification``: cross-entropy of the class logits.
* ``CausalLM``: mean next-token NLL over the sample's non-padding target tokens.
* ``CustomLoss(fn)``: any ``fn(model, batch) -> loss [B]`` or ``(loss [B], logits)``.

``load_model(name)`` knows two packaged names: ``"minilm"`` (all-MiniLM-L6-v2 with a new
classification head, initialised from ``head_seed`` so that every load is the same model) and ``"smollm2"`` (SmolLM2-135M-Instruct from its GGUF file); anything else is a
Hub id or a local path.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinf.errors import ConfigError, DataError
from fastinf.extraction.packaged import packaged_model_path
from fastinf.libquiet import quiet_libraries

# Keys of a batch that are passed to the model's forward (labels never are: tasks compute the loss).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

TASK_NAMES = ("seq-cls", "causal-lm")

log = logging.getLogger(__name__)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of ``batch`` that is fed to the model."""
    if "input_ids" not in batch:
        raise DataError(f"A batch needs 'input_ids'; found keys {sorted(batch)}.")
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def _logits_of(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise ConfigError(f"The model returned {type(out).__name__} without logits; expected a Hugging Face "
                          "model with a classification or LM head, or use CustomLoss.")
    return logits


class Task:
    """Defines the per-sample loss of a batch. Subclasses implement ``per_sample_loss``."""

    name = "task"

    def per_sample_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss [B] float, logits)``: one forward pass; ``loss[n]`` depends on sample ``n`` only."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample_loss(model, batch)")

    def predictions(self, logits: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred [B] int64, correct [B] bool)``; -1 / False when the task has no notion of it."""
        B = batch["input_ids"].shape[0]
        dev = batch["input_ids"].device
        return torch.full((B,), -1, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)

    def to_dict(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SequenceClassification(Task):
    """Cross-entropy of the class logits [B, C] against ``batch["labels"]`` [B]."""

    name = "seq-cls"

    def per_sample_loss(self, model, batch):
        if "labels" not in batch:
            raise DataError(f"Sequence classification needs 'labels' in the batch; found {sorted(batch)}.")
        logits = _logits_of(model(**model_inputs(batch)))
        if logits.dim() != 2:
            raise ConfigError(f"Sequence classification expects logits [B, C], got shape {tuple(logits.shape)}; "
                              "is this a causal-LM model? Use task='causal-lm'.")
        labels = batch["labels"].to(logits.device).long()
        C = logits.shape[1]
        if C < 2:
            raise ConfigError(f"Sequence classification needs >= 2 classes, but the model has a {C}-logit head "
                              "(its cross-entropy is 0 and every gradient 0); load it with num_labels >= 2.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
            bad = int(labels.max()) if int(labels.max()) >= C else int(labels.min())
            raise DataError(f"Labels must lie in [0, {C}) for the model's {C}-class head; label {bad} does not "
                            f"(found range [{int(labels.min())}, {int(labels.max())}]). Fix the labels or use a "
                            "model whose head has enough classes.")
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits

    def predictions(self, logits, batch):
        pred = logits.argmax(dim=-1)
        return pred, pred == batch["labels"].to(pred.device)


class CausalLM(Task):
    """Mean next-token NLL per sample over non-padding target tokens.

    Target ``t+1`` is scored from position ``t``; a target counts when ``attention_mask[t+1] == 1`` and
    ``labels[t+1] != -100`` (``labels`` defaults to ``input_ids``). A sample with no target scores 0.
    ``pred`` is -1; ``correct`` is True when greedy decoding reproduces every counted target token.
    """

    name = "causal-lm"

    def _targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        if labels.shape != ids.shape:
            labels = ids
        mask = batch.get("attention_mask", torch.ones_like(ids))
        tgt = labels[:, 1:]
        valid = (mask[:, 1:] != 0) & (tgt != -100)
        return tgt.clamp_min(0), valid

    def per_sample_loss(self, model, batch):
        logits = _logits_of(model(**model_inputs(batch)))
        if logits.dim() != 3:
            raise ConfigError(f"Causal LM expects logits [B, T, V], got shape {tuple(logits.shape)}; "
                              "is this a classification model? Use task='seq-cls'.")
        tgt, valid = self._targets(batch)
        tgt, valid = tgt.to(logits.device), valid.to(logits.device)
        lp = logits[:, :-1].float()
        nll = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
        w = valid.float()
        loss = (nll * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return loss, logits

    def predictions(self, logits, batch):
        tgt, valid = self._targets(batch)
        tgt, valid = tgt.to(logits.device), valid.to(logits.device)
        hit = (logits[:, :-1].argmax(dim=-1) == tgt) | ~valid
        B = tgt.shape[0]
        return torch.full((B,), -1, dtype=torch.long, device=logits.device), hit.all(dim=1) & valid.any(dim=1)


class CustomLoss(Task):
    """A user loss: ``fn(model, batch)`` returns ``loss [B]`` or ``(loss [B], logits)``.

    ``loss[n]`` must depend on sample ``n`` only (no batch mean), otherwise per-sample gradients mix
    samples. ``pred`` is the argmax of 2-D logits when ``labels`` are present, else -1.
    """

    name = "custom"

    def __init__(self, fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any]) -> None:
        if not callable(fn):
            raise ConfigError(f"CustomLoss needs a callable fn(model, batch), got {type(fn).__name__}.")
        self.fn = fn

    def per_sample_loss(self, model, batch):
        out = self.fn(model, batch)
        loss, logits = (out if isinstance(out, tuple) else (out, None))
        B = batch["input_ids"].shape[0]
        if not isinstance(loss, torch.Tensor) or loss.shape != (B,):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(f"CustomLoss fn must return a per-sample loss of shape ({B},), got {shape}; "
                              "use reduction='none' and reduce over tokens only.")
        return loss, logits

    def predictions(self, logits, batch):
        if logits is not None and logits.dim() == 2 and "labels" in batch and batch["labels"].dim() == 1:
            pred = logits.argmax(dim=-1)
            return pred, pred == batch["labels"].to(pred.device)
        return super().predictions(logits, batch)

    def __repr__(self) -> str:
        return f"CustomLoss({getattr(self.fn, '__name__', repr(self.fn))})"


def make_task(task: "str | Task | Callable") -> Task:
    """A Task from a name ("seq-cls", "causal-lm"), a Task, or a loss callable (-> CustomLoss)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        key = task.strip().lower().replace("_", "-")
        if key in ("seq-cls", "classification", "sequence-classification", "cls"):
            return SequenceClassification()
        if key in ("causal-lm", "lm", "clm"):
            return CausalLM()
        raise ConfigError(f"Unknown task {task!r}; expected one of {TASK_NAMES} or a loss callable.")
    if callable(task):
        return CustomLoss(task)
    raise ConfigError(f"task must be a name {TASK_NAMES}, a Task or a callable, got {type(task).__name__}.")


# ---------------------------------------------------------------------------------------------- loading

def load_model(name_or_path: str | os.PathLike, task: str = "seq-cls", num_labels: int | None = None,
               dtype: torch.dtype | str = torch.float32, gguf_file: str | None = None,
               device: str | torch.device = "cpu", head_seed: int = 0) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``task`` picks the head: "seq-cls" (AutoModelForSequenceClassification; ``num_labels`` defaults to
    the checkpoint's, or 2 for a headless checkpoint such as "minilm") or "causal-lm"
    (AutoModelForCausalLM). GGUF checkpoints are dequantised by transformers (``gguf_file``).
    A tokenizer without a pad token gets its EOS token as pad, and the model config is told.

    A classification head the checkpoint lacks (transformers reports its parameters as missing) is
    initialised under a forked torch RNG seeded with ``head_seed``, so every load gives the same model;
    ``model.config.fastinf_head = {"seed": head_seed, "initialised": [parameter names]}`` records it.
    A checkpoint's trained head is kept when the data needs fewer classes (``num_labels`` below its size)
    and refused when it needs more. ``task="causal-lm"`` is refused for a model without a trained LM head.
    """
    dtype = _checked_load_args(task, num_labels, dtype, head_seed)
    from fastinf.extraction.checkpoint import is_fastinf_checkpoint  # noqa: PLC0415

    if is_fastinf_checkpoint(name_or_path):  # a `fastinf train` checkpoint (trainable tensors + recipe)
        from fastinf.extraction.checkpoint import load_checkpoint  # noqa: PLC0415

        if task != "seq-cls":
            raise ConfigError(f"{name_or_path} is a fastinf sequence-classification checkpoint; use task='seq-cls'.")
        model, tok = load_checkpoint(name_or_path)
        _check_head_size(name_or_path, int(getattr(model.config, "num_labels", 0) or 0), num_labels)
        return model.to(device=device, dtype=dtype).eval(), tok
    model, tok = _load_hf(name_or_path, task, num_labels, dtype, gguf_file, head_seed)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    return model, tok


def _checked_load_args(task: str, num_labels: int | None, dtype: torch.dtype | str,
                       head_seed: int = 0) -> torch.dtype:
    """Validate the task, ``num_labels`` and ``head_seed`` of :func:`load_model`; the torch dtype named by ``dtype``."""
    if task not in TASK_NAMES:
        raise ConfigError(f"load_model task must be one of {TASK_NAMES}, got {task!r}.")
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels must be a positive int, got {num_labels!r}.")
    if isinstance(head_seed, bool) or not isinstance(head_seed, int) or head_seed < 0:
        raise ConfigError(f"head_seed must be a non-negative int, got {head_seed!r}.")
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                     "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                     "float64": torch.float64}[dtype.lower()]
        except KeyError as e:
            raise ConfigError(f"Unknown dtype {dtype!r}; expected float32, bfloat16, float16 or float64.") from e
    return dtype


_CLASSIFIER_ARCHS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                     "ForMultipleChoice")
_WARNED_HEADS: set[str] = set()


def _check_head_size(name: Any, head: int, num_labels: int | None) -> None:
    """Refuse data that needs more classes than a trained head of ``head`` classes has."""
    if num_labels is not None and head and num_labels > head:
        raise DataError(f"model {str(name)!r} has a trained {head}-class head, but the data needs {num_labels} "
                        f"classes (label {num_labels - 1} >= {head}); fix the labels or fine-tune a "
                        f"{num_labels}-class model first (fastinf train).")


def _head_size(config: Any, num_labels: int | None, name: Any) -> int:
    """Classes of the seq-cls head to build: a trained head keeps its size (fewer data classes are fine)."""
    archs = getattr(config, "architectures", None) or []
    if not any("SequenceClassification" in a for a in archs):
        if num_labels == 1:
            raise DataError(f"model {str(name)!r} needs a new classification head, and num_labels=1 would make it "
                            "1-logit (zero loss, all-zero gradients): sequence classification needs >= 2 classes. "
                            "If the data holds one class only, pass the task's class count (--num-labels).")
        return num_labels or 2
    head = int(getattr(config, "num_labels", 2))
    if head < 2:
        raise ConfigError(f"model {str(name)!r} has a {head}-output head (a regressor?); sequence classification "
                          "needs a head of >= 2 classes.")
    _check_head_size(name, head, num_labels)
    return head


def check_lm_task(config: Any, name: Any) -> None:
    """Refuse ``task='causal-lm'`` for a checkpoint that is a classifier (its LM head would be random)."""
    archs = getattr(config, "architectures", None) or []
    if archs and all(any(s in a for s in _CLASSIFIER_ARCHS) for a in archs):
        raise ConfigError(f"model {str(name)!r} is a classifier ({archs[0]}): it has no trained language-model "
                          "head, so task 'causal-lm' would score a random one; use task 'seq-cls', or a causal "
                          "LM checkpoint.")


def _record_new_params(model: nn.Module, name: Any, task: str, missing: list[str], head_seed: int) -> None:
    """Refuse an LM with newly initialised weights; record (and warn once about) a seeded new head."""
    if not missing:
        return
    if task == "causal-lm":
        raise ConfigError(f"model {str(name)!r} has no trained language-model head (transformers would initialise "
                          f"{', '.join(missing[:4])} at random); task 'causal-lm' needs a causal LM checkpoint.")
    model.config.fastinf_head = {"seed": int(head_seed), "initialised": list(missing)}
    key = f"{name}|{head_seed}"
    if key not in _WARNED_HEADS:
        _WARNED_HEADS.add(key)
        n = getattr(model.config, "num_labels", "?")
        log.warning("model %r has no trained classification head: a new one for %s classes (%s), seeded "
                    "(seed %d); fine-tune first (fastinf train) for scores that mean something", str(name), n,
                    ", ".join(missing[:4]), head_seed)


def _load_hf(name_or_path: str | os.PathLike, task: str, num_labels: int | None, dtype: torch.dtype,
             gguf_file: str | None, head_seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from transformers: a Hub id, a local directory or a packaged model (GGUF too)."""
    import transformers as tf  # noqa: PLC0415 - heavy import kept out of `import fastinf`

    path, packaged_gguf = packaged_model_path(str(name_or_path))
    gguf_file = gguf_file or packaged_gguf
    g: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with quiet_libraries(notice=False):          # fastinf reports a new head itself (one line)
            tok = tf.AutoTokenizer.from_pretrained(path, **g)
            config = tf.AutoConfig.from_pretrained(path, **g)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, task, e) from e
    kw: dict[str, Any] = {"dtype": dtype, **g}
    if task == "seq-cls":
        kw["num_labels"] = _head_size(config, num_labels, name_or_path)
        auto = tf.AutoModelForSequenceClassification
    else:
        check_lm_task(config, name_or_path)
        auto = tf.AutoModelForCausalLM
    try:
        with torch.random.fork_rng(devices=[]), quiet_libraries(notice=False):
            torch.manual_seed(head_seed)
            model, info = auto.from_pretrained(path, output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise _load_error(name_or_path, task, e) from e
    _record_new_params(model, name_or_path, task, sorted((info or {}).get("missing_keys") or []), head_seed)
    return model, tok


def _load_error(name: Any, task: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"Cannot load model {str(name)!r} for task {task!r}: {first}. Expected a Hub id "
                       "(cached, since runs are offline), a local directory, 'minilm' or 'smollm2'.")
