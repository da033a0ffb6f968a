"""Tiny Hugging Face model directories on disk (model + tokenizer), for tests of ``load_model`` and the CLI.

``save_tiny(directory, kind)``: ``"headless"`` is a bare ``BertModel`` (like the packaged MiniLM: no
classification head, so ``load_model`` must initialise one), ``"cls3"`` a ``BertForSequenceClassification``
with a (random but saved, hence "trained") 3-class head, ``"lm"`` a tiny GPT-2 causal LM.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer

__all__ = ["save_tiny", "random_texts"]


def save_tiny(directory: str | Path, kind: str = "headless") -> Path:
    """Write a tiny model of ``kind`` and its tokenizer to ``directory``; returns the directory."""
    directory = Path(directory)
    if kind == "headless":
        model = make_model("bert", "seq-cls").bert
        model.config.architectures = ["BertModel"]
    elif kind == "cls3":
        model = make_model("bert", "seq-cls")
    elif kind == "lm":
        model = make_model("gpt2", "causal-lm")
    else:
        raise KeyError(kind)
    model.save_pretrained(directory)
    tok = tiny_tokenizer(directory / "_vocab")
    if kind == "lm":
        tok = tf.BertTokenizerFast(vocab=str(directory / "_vocab" / "vocab.txt"))
    tok.save_pretrained(directory)
    return directory


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
