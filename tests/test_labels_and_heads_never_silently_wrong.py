"""Data and heads never give wrong results without an error: a missing label is no extra class, a fractional
label is not truncated, a missing text is not the string "None", a one-class problem gets no 1-logit head,
a classifier is not run as a causal LM with a random LM head, and a label the head cannot produce is named.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset, from_hf, load_dataset_spec
from fastinf.errors import ConfigError, DataError
from fastinf.extraction.models import load_model
from tests._hf_dirs import random_texts, save_tiny


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("missing", [None, float("nan"), "nan", "NaN", "", "null"])
def test_a_missing_label_is_refused_not_a_class(tmp_path, missing) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": missing}]
    with pytest.raises(DataError, match=r"missing.*row 2"):
        load_dataset_spec(_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match="missing"):
        from_hf({"text": ["a", "b", "c"], "label": [0, 1, missing]})


def test_a_missing_label_in_a_csv_is_refused(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("text,label\nhello,0\nworld,\nagain,1\n")
    with pytest.raises(DataError, match=r"missing.*row 1"):
        load_dataset_spec(str(tmp_path / "d.csv"))


@pytest.mark.parametrize("value", [1.7, "1.7", -0.5, float("inf")])
def test_a_fractional_label_is_refused_not_truncated(tmp_path, value) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": value}]
    with pytest.raises(DataError, match="row 1"):
        load_dataset_spec(_jsonl(tmp_path / "d.jsonl", rows))


def test_integral_float_labels_are_their_class(tmp_path) -> None:
    rows = [{"text": "a", "label": 0.0}, {"text": "b", "label": 1.0}, {"text": "c", "label": "2.0"}]
    ds = load_dataset_spec(_jsonl(tmp_path / "d.jsonl", rows))
    assert ds.labels.tolist() == [0, 1, 2] and ds.label_names is None
    names = from_hf({"text": ["a", "b", "c"], "label": ["spam", "ham", "spam"]})
    assert names.labels.tolist() == [1, 0, 1] and names.label_names == ["ham", "spam"]


def test_text_dataset_checks_its_label_array() -> None:
    with pytest.raises(DataError, match=r"1\.7.*row 1"):
        TextDataset(texts=["a", "b"], labels=np.array([0.0, 1.7]))
    with pytest.raises(DataError, match="missing"):
        TextDataset(texts=["a", "b"], labels=np.array([0.0, np.nan]))
    with pytest.raises(DataError, match="missing"):
        TextDataset(texts=["a", "b"], labels=[0, None])
    assert TextDataset(texts=["a", "b"], labels=np.array([0.0, 1.0])).labels.dtype == np.int64


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_missing_text_is_refused_not_the_string_none(tmp_path, missing) -> None:
    with pytest.raises(DataError, match=r"text is missing.*row 1"):
        TextDataset(texts=["a", missing], labels=[0, 1])
    with pytest.raises(DataError, match=r"text pair is missing.*row 0"):
        TextDataset(texts=["a", "b"], text_pairs=[missing, "y"], labels=[0, 1])
    rows = [{"text": "a", "label": 0}, {"text": None, "label": 1}]
    with pytest.raises(DataError, match="text is missing"):
        load_dataset_spec(_jsonl(tmp_path / "d.jsonl", rows))


def test_a_column_only_later_rows_have_is_not_dropped() -> None:
    # the pair column of row 1 is seen (not silently dropped because row 0 lacks it); row 0's pair is missing
    with pytest.raises(DataError, match=r"text pair is missing.*row 0"):
        from_hf([{"text": "a", "label": 0}, {"text": "b", "label": 1, "text_pair": "q"}])
    ds = from_hf([{"text": "a", "label": 0, "text_pair": "p"}, {"text": "b", "label": 1, "text_pair": "q"}])
    assert ds.text_pairs == ["p", "q"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: save_tiny(root / k, k) for k in ("headless", "cls3")}


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_load_model_refuses_a_nonsense_num_labels(dirs, n) -> None:
    with pytest.raises(ConfigError, match="num_labels"):
        load_model(dirs["headless"], num_labels=n)


def test_a_one_class_head_is_refused(dirs) -> None:
    with pytest.raises(DataError, match=">= 2 classes"):
        load_model(dirs["headless"], num_labels=1)


def test_a_one_logit_model_is_refused_in_capture() -> None:
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector
    from fastinf.extraction.units import discover, select
    from tests._models import make_batch, make_model

    model = make_model("bert")
    model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
    model.config.num_labels = 1
    units = select(discover(model), "last")
    proj = {u.name: UnitProjector(u, ProjectionSpec("exact")) for u in units}
    batch = make_batch([4, 5, 3])
    batch["labels"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ConfigError, match=">= 2 classes"):
        features_for_batch(model, units, proj, batch, "seq-cls")


def test_a_label_beyond_the_head_is_named_in_capture() -> None:
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector
    from fastinf.extraction.units import discover, select
    from tests._models import NUM_LABELS, make_batch, make_model

    model = make_model("bert")
    units = select(discover(model), "last")
    proj = {u.name: UnitProjector(u, ProjectionSpec("exact")) for u in units}
    batch = make_batch([4, 5, 3])
    batch["labels"] = torch.tensor([0, NUM_LABELS + 1, 1])
    with pytest.raises(DataError, match=rf"{NUM_LABELS}-class head; label {NUM_LABELS + 1} does not"):
        features_for_batch(model, units, proj, batch, "seq-cls")


def test_causal_lm_on_a_classifier_is_refused(dirs) -> None:
    with pytest.raises(ConfigError, match="is a classifier"):
        load_model(dirs["cls3"], task="causal-lm")
    with pytest.raises(ConfigError, match="no trained language-model head"):
        load_model(dirs["headless"], task="causal-lm")


def test_a_lm_checkpoint_still_loads_as_causal_lm(tmp_path) -> None:
    d = save_tiny(tmp_path / "lm", "lm")
    model, _ = load_model(d, task="causal-lm")
    assert type(model).__name__ == "GPT2LMHeadModel" and getattr(model.config, "fastinf_head", None) is None


def _cli(argv, capsys):
    from fastinf.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def test_cli_refuses_one_class_data_before_writing(dirs, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "one.jsonl", [{"text": t, "label": 0} for t in random_texts(6)])
    rc, err = _cli(["extract", "--model", str(dirs["headless"]), "--data", data, "--out", str(tmp_path / "s"),
                    "--proj", "2x2", "--layers", "last", "--no-progress"], capsys)
    assert rc == 2 and ">= 2 classes" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_cli_refuses_causal_lm_on_a_classifier(dirs, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in random_texts(4)])
    rc, err = _cli(["extract", "--model", str(dirs["cls3"]), "--data", data, "--out", str(tmp_path / "s"),
                    "--task", "causal-lm", "--no-progress"], capsys)
    assert rc == 2 and "is a classifier" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
    rc, err = _cli(["layers", str(dirs["cls3"]), "--task", "causal-lm"], capsys)
    assert rc == 2 and "is a classifier" in err


def test_cli_refuses_more_classes_than_the_trained_head(dirs, tmp_path, capsys) -> None:
    rows = [{"text": t, "label": i % 5} for i, t in enumerate(random_texts(10))]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    rc, err = _cli(["extract", "--model", str(dirs["cls3"]), "--data", data, "--out", str(tmp_path / "s"),
                    "--proj", "2x2", "--layers", "last", "--no-progress"], capsys)
    assert rc == 2 and "3-class head" in err and "label 4" in err
    assert not (tmp_path / "s").exists()
    rc, err = _cli(["layers", str(dirs["headless"]), "--num-labels", "0"], capsys)
    assert rc == 2 and "num_labels" in err


def test_cli_accepts_fewer_classes_than_the_trained_head(dirs, tmp_path, capsys) -> None:
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(random_texts(6))]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    rc, err = _cli(["extract", "--model", str(dirs["cls3"]), "--data", data, "--out", str(tmp_path / "s"),
                    "--proj", "2x2", "--layers", "last", "--no-progress", "--batch-size", "3",
                    "--max-length", "12"], capsys)
    assert rc == 0, err
    from fastinf import GradientStore

    store = GradientStore.open(tmp_path / "s")
    assert store.meta.logits.shape == (6, 3)
