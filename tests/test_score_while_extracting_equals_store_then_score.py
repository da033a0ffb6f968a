"""Score-while-extracting gives the scores of store-then-score (extract a train store, then fastinf.score).

Tiny models of every family, exact and 16x16 projections, every streaming method; fresh random texts per
case. float32: relative error <= 1e-5 (the GEMM shapes differ: one train batch instead of a store block);
float64 scoring of the same fp16-rounded features: <= 1e-10. A kept store is byte-identical to the store
``extract`` writes with the same arguments.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
from fastinf.scoring.estimators import score
from fastinf.scoring.extract_score import STREAM_METHODS, score_while_extracting
from tests._models import FAMILIES, NUM_LABELS, make_model
from tests._tokenizer import random_texts, tiny_tokenizer
from tests.scripts.assets import store_files

KW = dict(batch_size=4, max_length=12, progress=False)


def _data(n: int, seed: int, task: str) -> TextDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_LABELS, n) if task == "seq-cls" else None
    return TextDataset(texts=random_texts(n, seed, max_len=10), labels=labels, name=f"d{seed}")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _pair(tmp_path, family: str, task: str, proj: str, seed: int, n_train: int = 19):
    tok = tiny_tokenizer(tmp_path / "vocab")
    model = make_model(family, task, seed=seed)
    train_ds, test_ds = _data(n_train, 100 + seed, task), _data(5, 200 + seed, task)
    test = extract(model, tok, test_ds, tmp_path / "test", proj=proj, task=task, **KW)
    train = extract(model, tok, train_ds, tmp_path / "train", proj=proj, task=task, chunk_size=8, **KW)
    return model, tok, train_ds, test, train


CASES = [(f, t) for f, ts in FAMILIES.items() for t in ts]


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("proj", ["exact", "16x16"])
def test_graddot_equals_store_then_score_every_family(tmp_path, family, task, proj):
    seed = sum(map(ord, family + task + proj)) % 1000
    model, tok, train_ds, test, train = _pair(tmp_path, family, task, proj, seed)
    ref = score(test, train, "graddot")
    got = score_while_extracting(model, tok, train_ds, test, "graddot", chunk_size=8, task=task, **KW)
    assert got.unit_names == ref.unit_names and got.n_train == ref.n_train == len(train_ds)
    assert np.array_equal(got.train_ids, ref.train_ids) and np.array_equal(got.test_ids, ref.test_ids)
    for name in ref.unit_names:
        assert np.abs(ref.unit_scores(name)).max() > 0
        assert _rel(got.unit_scores(name), ref.unit_scores(name)) <= 1e-5, name


@pytest.mark.parametrize("method", STREAM_METHODS)
def test_every_method_equals_store_then_score_and_kept_store_is_byte_identical(tmp_path, method):
    model, tok, train_ds, test, train = _pair(tmp_path, "bert", "seq-cls", "4x4", seed=7)
    curved = method in ("if", "datainf", "lissa")
    ref = score(test, train, method)
    ref64 = score(test, train, method, precision="float64")
    kept = tmp_path / "kept"
    got = score_while_extracting(model, tok, train_ds, test, method, chunk_size=8, keep_store=kept,
                                 preconditioner_from=train if curved else None, **KW)
    got64 = score_while_extracting(model, tok, train_ds, test, method, chunk_size=8, precision="float64",
                                   preconditioner_from=train if curved else None, **KW)
    for name in ref.unit_names:
        assert _rel(got.unit_scores(name), ref.unit_scores(name)) <= 1e-5, name
        assert _rel(got64.unit_scores(name), ref64.unit_scores(name)) <= 1e-10, name
    files = store_files(kept)
    assert files == store_files(train.path), "the kept store must be the store extract writes"


def test_any_chunk_size_equals_store_then_score_with_that_chunk_size(tmp_path):
    """The chunk (commit unit, and the span batches are length-sorted in) may be anything, also one
    that does not divide N; the scores equal those of a store extracted with the same chunk size."""
    model, tok, train_ds, test, _ = _pair(tmp_path, "llama", "seq-cls", "exact", seed=3, n_train=23)
    for chunk in (4, 23):
        train = extract(model, tok, train_ds, tmp_path / f"train{chunk}", proj="exact", chunk_size=chunk, **KW)
        ref = score(test, train, "graddot")
        got = score_while_extracting(model, tok, train_ds, test, chunk_size=chunk, **KW)
        for name in ref.unit_names:
            assert _rel(got.unit_scores(name), ref.unit_scores(name)) <= 1e-5, (chunk, name)


def test_layers_select_a_subset_of_the_test_units(tmp_path):
    model, tok, train_ds, test, train = _pair(tmp_path, "gpt2", "seq-cls", "16x16", seed=5)
    got = score_while_extracting(model, tok, train_ds, test, "gradcos", layers="last", **KW)
    ref = score(test, train, "gradcos", layers="last")
    assert got.unit_names == ref.unit_names and len(ref.unit_names) < len(test.unit_names)
    for name in ref.unit_names:
        assert _rel(got.unit_scores(name), ref.unit_scores(name)) <= 1e-5


def test_rerun_recomputes_nothing_and_a_kept_store_is_never_replaced_unasked(tmp_path, monkeypatch):
    model, tok, train_ds, test, train = _pair(tmp_path, "bert", "seq-cls", "4x4", seed=11)
    out, kept = tmp_path / "o", tmp_path / "k"
    first = score_while_extracting(model, tok, train_ds, test, out=out, keep_store=kept, **KW)
    before, store_before = store_files(out), store_files(kept)
    import fastinf.extraction.extract as ex

    def no_capture(*a, **k):
        raise AssertionError("a finished request must not extract again")

    monkeypatch.setattr(ex, "_extract_batch", no_capture)
    again = score_while_extracting(model, tok, train_ds, test, out=out, keep_store=kept, **KW)
    assert store_files(out) == before and again.unit_names == first.unit_names
    monkeypatch.undo()
    tmp = score_while_extracting(model, tok, train_ds, test, keep_store=kept, **KW)   # out=None: temporary
    assert store_files(kept) == store_before, "the kept store was rewritten"
    for name in first.unit_names:
        assert np.array_equal(tmp.unit_scores(name), first.unit_scores(name))
