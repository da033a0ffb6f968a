"""Scoring stores written by the real extraction (tiny random BERT, offline tokenizer).

Pins the extraction <-> estimator contract: with exact embedding features, TracIn-WE computed from the
stored token ids and per-position embedding gradients equals graddot on the exact embedding unit; and
the selfinf / loss baselines read the extracted metadata.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.data.datasets import TextDataset
from fastinf.scoring.estimators import score, tracin_we_reference
from fastinf.extraction.extract import extract
from tests._models import make_model
from tests._tokenizer import SPECIAL, WORDS, random_texts


def _tokenizer():
    """The tiny WordPiece vocabulary, passed as ``vocab=`` (transformers v5 ignores ``vocab_file=``)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("xs")
    tok = _tokenizer()
    model = make_model("bert")
    rng = np.random.default_rng(0)

    def run(name: str, n: int, seed: int):
        # short texts over a small slice of the vocabulary: repeated tokens, and pairs with and without overlap
        texts = [" ".join(f"w{int(w[1:]) % 9}" for w in t.split()) for t in random_texts(n, seed, max_len=6)]
        ds = TextDataset(texts=texts, labels=rng.integers(0, 3, n), name=name)
        return extract(model, tok, ds, root / name, layers="first,last", proj="exact", dtype="fp32",
                       batch_size=4, max_length=12, token_grads=True, progress=False)

    return run("test", 5, 1), run("train", 14, 2)


def test_tracin_we_equals_exact_embedding_graddot(stores):
    test, train = stores
    emb = [u for u in train.units if u.kind == "embedding"]
    assert len(emb) == 1
    name = emb[0].name
    we = score(test, train, "tracin_we", precision="float64")
    assert we.unit_names == [name]
    dot = score(test, train, "graddot", layers="first", precision="float64").unit_scores(name)
    tokens = np.asarray(train.extra("tokens"))
    assert len(np.unique(tokens[tokens > 4])) > 3, "the texts must tokenize to real words, not [UNK]"
    lit = tracin_we_reference(test.extra("tokens"), test.extra("embed_grads"),
                              train.extra("tokens"), train.extra("embed_grads"))
    scale = np.abs(lit).max()
    assert np.abs(we.unit_scores(name) - lit).max() < 1e-5 * scale
    assert np.abs(dot - lit).max() < 1e-4 * scale, "exact embedding graddot must equal TracIn-WE"


def test_baselines_read_extracted_metadata(stores):
    test, train = stores
    loss = score(None, train, "loss")
    np.testing.assert_allclose(loss.unit_scores("loss")[0], -np.asarray(train.meta.loss), rtol=1e-6)
    s = score(test, train, "if", layers="last")
    np.testing.assert_array_equal(s.test_correct, np.asarray(test.meta.correct))
    assert np.isfinite(s.unit_scores(s.unit_names[0])).all()
