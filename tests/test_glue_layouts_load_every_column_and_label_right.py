"""GLUE-like files load with every text and the right labels: headerless files (``header: false`` + names or
indices, CoLA's layout detected), pair columns (question/sentence, question1/question2, sentence1/sentence2),
string labels mapped by name the same way in every split, regression scores refused or binarised by an
explicit threshold. Fixture files: ``tests/fixtures/glue/`` (shapes of the real GLUE files, a few rows)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fastinf.data.datasets import TextDataset, from_hf, load_dataset_spec
from fastinf.data.labels import align_label_names, label_names_from_config
from fastinf.errors import DataError

GLUE = Path(__file__).parent / "fixtures" / "glue"


def test_cola_headerless_layout_is_detected_first_row_is_data() -> None:
    ds = load_dataset_spec(str(GLUE / "cola_train.tsv"))
    assert len(ds) == 5, "the first line is a sample, not a header"
    assert ds.texts[0].startswith("Our friends will not buy")
    assert ds.labels.tolist() == [1, 1, 0, 1, 0] and ds.text_pairs is None


def test_header_false_with_names_or_indices(tmp_path) -> None:
    by_name = load_dataset_spec(str(GLUE / "cola_train.tsv"), header=False,
                                columns=["source", "label", "mark", "sentence"])
    assert by_name.labels.tolist() == [1, 1, 0, 1, 0] and by_name.texts[4] == "They drank the pub."
    by_index = load_dataset_spec(str(GLUE / "sms_headerless_only_spam.tsv"), header=False, text_column=1,
                                 label_column=0, label_names=["ham", "spam"])
    assert len(by_index) == 2 and by_index.labels.tolist() == [1, 1] and by_index.texts[0].startswith("WINNER")
    with pytest.raises(DataError, match="columns names 3 column"):
        load_dataset_spec(str(GLUE / "cola_train.tsv"), header=False, columns=["a", "b", "c"])
    with pytest.raises(DataError, match="index 7 is out of range"):
        load_dataset_spec(str(GLUE / "cola_train.tsv"), header=False, text_column=7, label_column=1)
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(DataError, match="apply to .csv and .tsv"):
        load_dataset_spec(str(tmp_path / "d.jsonl"), header=False)


def test_a_header_naming_known_columns_is_never_taken_for_data(tmp_path) -> None:
    # four fields that would match CoLA's shape, but the first row names known columns: a header
    (tmp_path / "h.tsv").write_text("source\tlabel\tmark\tsentence\ngj04\t1\t\tA fine sentence.\n")
    ds = load_dataset_spec(str(tmp_path / "h.tsv"))
    assert len(ds) == 1 and ds.texts == ["A fine sentence."]
    (tmp_path / "nohint.tsv").write_text("hello world\t1\nbye\t0\n")
    with pytest.raises(DataError, match="header: false"):
        load_dataset_spec(str(tmp_path / "nohint.tsv"))


@pytest.mark.parametrize("name,first,second", [
    ("qnli_train.tsv", "What came into force", "As of that day"),
    ("qqp_train.tsv", "How do I learn Python?", "What is the best way"),
    ("rte_train.tsv", "No Weapons of Mass", "Weapons of Mass"),
])
def test_pair_files_keep_both_texts(name, first, second) -> None:
    ds = load_dataset_spec(str(GLUE / name))
    assert ds.text_pairs is not None, "a pair file must not lose its second text"
    assert ds.texts[0].startswith(first) and ds.text_pairs[0].startswith(second)


def test_qnli_string_labels_are_mapped_and_recorded() -> None:
    ds = load_dataset_spec(str(GLUE / "qnli_train.tsv"))
    assert ds.label_names == ["entailment", "not_entailment"]
    assert ds.labels.tolist() == [0, 1, 1, 0]
    ds = load_dataset_spec(str(GLUE / "qnli_train.tsv"), label_names=["not_entailment", "entailment"])
    assert ds.labels.tolist() == [1, 0, 0, 1] and ds.label_names == ["not_entailment", "entailment"]
    with pytest.raises(DataError, match="'entailment' at row 0 is not one of the label names"):
        load_dataset_spec(str(GLUE / "qnli_train.tsv"), label_names=["not_entailment"])


def test_a_test_split_holding_some_names_maps_them_like_train() -> None:
    train = load_dataset_spec(str(GLUE / "qnli_train.tsv"))
    test = load_dataset_spec(str(GLUE / "qnli_dev_one_name.tsv"))
    assert test.labels.tolist() == [0, 0], "mapped on its own, the only name present becomes class 0"
    aligned = align_label_names(test, train)
    assert aligned.labels.tolist() == [1, 1] and aligned.label_names == train.label_names
    spam = load_dataset_spec(str(GLUE / "sms_headerless_only_spam.tsv"), header=False, text_column=1,
                             label_column=0)
    assert align_label_names(spam, ["ham", "spam"]).labels.tolist() == [1, 1]
    with pytest.raises(DataError, match="'spam' is not a class of the reference set"):
        align_label_names(spam, ["ham", "other"])
    with pytest.raises(DataError, match="integers"):
        align_label_names(spam, TextDataset(texts=["a"], labels=[0]))


def test_fastinf_run_maps_the_test_split_like_train(tmp_path) -> None:
    from fastinf.experiment.config import RunConfig
    from fastinf.experiment.splits import load_splits

    cfg = RunConfig.from_dict({"data": {"train": {"path": str(GLUE / "qnli_train.tsv")},
                                        "test": {"path": str(GLUE / "qnli_dev_one_name.tsv")}}})
    train, test = load_splits(cfg)
    assert train.label_names == test.label_names == ["entailment", "not_entailment"]
    assert test.labels.tolist() == [1, 1]
    text = yaml.safe_dump({"data": {"train": {"path": str(GLUE / "cola_train.tsv"), "header": False,
                                              "columns": ["source", "label", "mark", "sentence"]}}})
    (tmp_path / "c.yaml").write_text(text)
    assert RunConfig.from_yaml(tmp_path / "c.yaml").data.train["header"] is False


def test_regression_scores_are_refused_or_binarised_by_an_explicit_threshold() -> None:
    with pytest.raises(DataError, match="regression score.*label_threshold"):
        load_dataset_spec(str(GLUE / "stsb_train.tsv"))
    ds = load_dataset_spec(str(GLUE / "stsb_train.tsv"), label_threshold=3.0)
    assert ds.labels.tolist() == [1, 1, 0, 0] and ds.label_names == ["< 3", ">= 3"]
    assert ds.text_pairs[1] == "A man is playing a bamboo flute."
    with pytest.raises(DataError, match="not a number"):
        load_dataset_spec(str(GLUE / "qnli_train.tsv"), label_threshold=0.5)


def test_hf_class_label_names_and_model_config_names() -> None:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    hf = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [1, 0]}, features=feats)
    ds = from_hf(hf)
    assert ds.label_names == ["negative", "positive"] and ds.labels.tolist() == [1, 0]

    class Cfg:
        id2label = {0: "ham", 1: "spam"}

    class Default:
        id2label = {0: "LABEL_0", 1: "LABEL_1"}

    assert label_names_from_config(Cfg()) == ["ham", "spam"]
    assert label_names_from_config(Default()) is None
    mapped = from_hf({"text": ["x", "y"], "label": ["spam", "spam"]}, label_names=label_names_from_config(Cfg()))
    assert np.array_equal(mapped.labels, [1, 1])
