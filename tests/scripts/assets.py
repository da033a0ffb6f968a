"""Offline assets for the subprocess tests (distributed runs, kill-and-resume): a tiny random BERT
classifier saved with ``save_pretrained`` next to a tiny WordPiece tokenizer, and JSONL datasets.

``python -m fastinf extract --model DIR/model --data DIR/train.jsonl ...`` then works without a hub.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._models import NUM_LABELS, make_model  # noqa: E402
from tests._tokenizer import random_texts, tiny_tokenizer  # noqa: E402


def write_jsonl(path: Path, n: int, seed: int) -> Path:
    """``n`` random texts with labels cycling through every class (so the class count is NUM_LABELS)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_LABELS, n)
    labels[:NUM_LABELS] = np.arange(NUM_LABELS)
    with open(path, "w") as f:
        for t, y in zip(random_texts(n, seed, max_len=14), labels):
            f.write(json.dumps({"text": t, "label": int(y)}) + "\n")
    return path


def make_assets(directory: str | Path, n_train: int = 96, n_test: int = 12) -> dict[str, Path]:
    """Save the tiny model + tokenizer and the train/test JSONL files under ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model_dir = d / "model"
    if not (model_dir / "config.json").is_file():
        model = make_model("bert", "seq-cls", seed=0)
        model.save_pretrained(model_dir)
        tiny_tokenizer(d / "vocab").save_pretrained(model_dir)
    return {"model": model_dir, "train": write_jsonl(d / "train.jsonl", n_train, 1),
            "test": write_jsonl(d / "test.jsonl", n_test, 2)}


def store_files(path: str | Path) -> dict[str, bytes]:
    """Every file of a store or score set (bytes), except replayable run configs and the caches that
    scoring adds next to a store (``precond/``, ``index/``)."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith("_config.json")
            and p.relative_to(path).parts[0] not in ("precond", "index")}


if __name__ == "__main__":
    print(make_assets(sys.argv[1]))
