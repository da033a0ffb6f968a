"""extract(reps=True) stores, per sample, the mean over its own tokens of every hidden state, and
repsim over those stores is the cosine of them: padding and batch-mates change nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.data import TextDataset
from fastinf.errors import ConfigError
from fastinf.extraction.extract import extract
from fastinf.scoring.estimators import score
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer


def _literal_reps(model, tok, texts, max_length):
    """One sample at a time (no padding at all), float64 mean of each hidden state over its tokens."""
    rows = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**{k: v for k, v in enc.items()}, output_hidden_states=True)
            rows.append(np.stack([h[0].double().mean(0).numpy() for h in out.hidden_states]))
    return np.stack(rows)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reps_equal_per_sample_hidden_state_means(tmp_path, family):
    model = make_model(family, "seq-cls", seed=3)
    tok = tiny_tokenizer(tmp_path / "tok")
    texts = random_texts(9, seed=5, min_len=2, max_len=14)
    ds = TextDataset(texts=texts, labels=np.arange(9) % 3)
    store = extract(model, tok, ds, tmp_path / "s", layers="all", proj="4x4", dtype="fp32", batch_size=4,
                    max_length=16, progress=False, reps=True)
    reps = np.asarray(store.extra("reps"))
    ref = _literal_reps(model, tok, texts, 16)
    assert reps.shape == ref.shape == (9, model.config.num_hidden_layers + 1, model.config.hidden_size)
    np.testing.assert_allclose(reps, ref, rtol=2e-4, atol=2e-5)


def test_repsim_of_extracted_reps_is_their_cosine(tmp_path):
    model = make_model("bert", "seq-cls", seed=1)
    tok = tiny_tokenizer(tmp_path / "tok")
    train = TextDataset(texts=random_texts(7, seed=1), labels=np.arange(7) % 3)
    test = TextDataset(texts=random_texts(3, seed=2), labels=np.arange(3) % 3)
    kw = dict(layers="all", proj="4x4", dtype="fp32", batch_size=3, max_length=16, progress=False, reps=True)
    s_tr = extract(model, tok, train, tmp_path / "tr", **kw)
    s_te = extract(model, tok, test, tmp_path / "te", **kw)
    res = score(s_te, s_tr, "repsim", precision="float64")
    q, g = np.asarray(s_te.extra("reps"), np.float64), np.asarray(s_tr.extra("reps"), np.float64)
    for b in range(q.shape[1]):
        qn = q[:, b] / np.linalg.norm(q[:, b], axis=1, keepdims=True)
        gn = g[:, b] / np.linalg.norm(g[:, b], axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(res.unit_scores(f"reps.{b}")), qn @ gn.T, rtol=1e-5, atol=1e-6)


def test_reps_refused_for_a_model_without_layer_count(tmp_path):
    class Bare(torch.nn.Module):
        config = None

    from fastinf.extraction.reps import reps_shape

    with pytest.raises(ConfigError, match="num_hidden_layers"):
        reps_shape(Bare())
