"""A model whose classifier head fastinf initialised with a seed (``config.fastinf_head``) gets that record
in the store manifest (``identity.model.head``), so a store says where its head came from; a model
without one records nothing extra."""
from __future__ import annotations

import json

import numpy as np

from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer


def test_the_seeded_head_is_recorded_in_the_manifest(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    ds = TextDataset(texts=random_texts(6), labels=np.arange(6) % 3, name="tiny")
    model = make_model("bert")
    model.config.fastinf_head = {"seed": 7, "initialised": ["classifier.weight", "classifier.bias"]}
    store = extract(model, tok, ds, tmp_path / "s", layers="last", proj="4x4", max_length=16, progress=False)
    head = json.loads((tmp_path / "s" / "manifest.json").read_text())["identity"]["model"]["head"]
    assert head == {"seed": 7, "initialised": ["classifier.weight", "classifier.bias"]}
    assert store.identity["model"]["head"]["seed"] == 7
    plain = extract(make_model("bert"), tok, ds, tmp_path / "p", layers="last", proj="4x4", max_length=16,
                    progress=False)
    assert "head" not in plain.identity["model"]
