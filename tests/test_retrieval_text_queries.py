"""Invariant: searching with a file of new texts equals searching with a store extracted from them.

The texts are extracted on the fly with the model recorded in the train store's manifest (a tiny random
BERT saved to a temporary directory), the index's units and the store's projection.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError
from fastinf.extraction.extract import extract
from fastinf.retrieval.build import build_index
from fastinf.retrieval.search import search
from tests._models import NUM_LABELS, make_model
from tests._tokenizer import random_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    model, tok = make_model("bert"), tiny_tokenizer(tmp / "tok")
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    rng = np.random.default_rng(0)
    train = TextDataset(random_texts(40, seed=1), labels=rng.integers(0, NUM_LABELS, 40), name="train")
    store = extract(model, tok, train, tmp / "train", layers="attn.v,last", proj="4x4", progress=False,
                    model_name=str(tmp / "model"), batch_size=8)
    return tmp, model, tok, store


def test_text_file_queries_equal_extracted_store(saved):
    tmp, model, tok, store = saved
    texts = random_texts(4, seed=7)
    labels = [0, 2, 1, 1]
    path = tmp / "queries.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    idx = build_index(store, groups="joint", out=tmp / "idx")
    got = search(idx, str(path), k=6, direction="both")
    qstore = extract(model, tok, TextDataset(texts, labels=np.array(labels)), tmp / "q", layers="attn.v,last",
                     proj="4x4", progress=False, batch_size=8)
    want = idx.search(qstore, k=6, direction="both")
    assert np.array_equal(got.train, want.train) and np.array_equal(got.query, want.query)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-6)
    assert len(got) == 2 * 6 * 4


def test_unloadable_model_is_a_clear_error(saved, tmp_path):
    _, model, tok, _ = saved
    ds = TextDataset(random_texts(10, seed=2), labels=np.zeros(10, dtype=np.int64))
    store = extract(model, tok, ds, tmp_path / "anon", layers="last", proj="4x4", progress=False,
                    batch_size=8)  # unsaved model: the store records no loadable model name
    path = tmp_path / "q.tsv"
    path.write_text("text\tlabel\nw1 w2\t0\n")
    with pytest.raises(ConfigError, match=r"(?s)could not be loaded.*pass the query store"):
        search(build_index(store, out=tmp_path / "i"), str(path), k=2)
