"""Two stores whose datasets map label strings to class ids differently cannot be scored together:
the store manifest records label_names and check_compatible compares them."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.data import TextDataset
from fastinf.errors import StoreMismatchError
from fastinf.extraction.extract import extract
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer


def _store(tmp_path, name, label_names):
    model = make_model("bert", "seq-cls", seed=0)
    tok = tiny_tokenizer(tmp_path / "tok")
    ds = TextDataset(texts=random_texts(4, seed=1), labels=np.array([0, 1, 2, 0]), label_names=label_names)
    return extract(model, tok, ds, tmp_path / name, layers="last", proj="2x2", dtype="fp32", batch_size=4,
                   max_length=12, progress=False)


def test_label_names_are_recorded_and_compared(tmp_path):
    a = _store(tmp_path, "a", ["neg", "neu", "pos"])
    b = _store(tmp_path, "b", ["neu", "neg", "pos"])
    c = _store(tmp_path, "c", ["neg", "neu", "pos"])
    assert a.identity["dataset"]["label_names"] == ["neg", "neu", "pos"]
    with pytest.raises(StoreMismatchError, match="label_names"):
        a.check_compatible(b)
    a.check_compatible(c)


def test_stores_without_label_names_stay_compatible(tmp_path):
    a = _store(tmp_path, "a", None)
    b = _store(tmp_path, "b", ["x", "y", "z"])
    assert "label_names" not in a.identity["dataset"]
    a.check_compatible(b)
