"""A tiny offline WordPiece tokenizer (vocabulary of tests/_models.VOCAB tokens) and matching texts.

Built from a vocab file written into a temporary directory, so tests need neither the hub nor a
packaged model. Token id 0 is [PAD] (= tests/_models.PAD_ID).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests._models import VOCAB

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def tiny_tokenizer(directory: str | Path):
    """A BertTokenizerFast over SPECIAL + WORDS (VOCAB tokens in all)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def random_texts(n: int, seed: int = 0, min_len: int = 2, max_len: int = 12) -> list[str]:
    """n texts of random words from the tiny vocabulary, with varied lengths."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(min_len, max_len + 1)))) for _ in range(n)]
