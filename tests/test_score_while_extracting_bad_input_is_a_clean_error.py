"""Bad score-while-extracting requests fail with one FastinfError before any work, leaving no output:
unsupported methods, curvature without a fitted preconditioner, another model than the test store's, a
file as output, conflicting CLI flags."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.cli.app import main as fastinf_main
from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError, FastinfError, StoreMismatchError
from fastinf.extraction.extract import extract
from fastinf.scoring.extract_score import score_while_extracting
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer

KW = dict(batch_size=4, max_length=12, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("swe_bad")
    tok = tiny_tokenizer(root / "vocab")
    model = make_model("bert")
    ds = TextDataset(texts=random_texts(9, 1), labels=np.arange(9) % 3, name="tr")
    test = extract(model, tok, TextDataset(texts=random_texts(3, 2), labels=np.arange(3), name="te"),
                   root / "test", proj="4x4", **KW)
    train = extract(model, tok, ds, root / "train", proj="4x4", **KW)
    return root, model, tok, ds, test, train


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "selfinf"}, "cannot score while extracting"),
    ({"method": "tracin_we"}, "cannot score while extracting"),
    ({"method": "datainf"}, "preconditioner_from"),
    ({"method": "if"}, "preconditioner_from"),
    ({"method": "graddot", "damping": 1e-3}, "damping"),
    ({"method": "graddot", "resume": True, "overwrite": True}, "exclude"),
    ({"method": "graddot", "batch_size": 0}, "batch_size"),
    ({"method": "graddot", "precision": "float16"}, "precision"),
])
def test_bad_options_are_refused_before_any_output(setup, tmp_path, kwargs, match):
    root, model, tok, ds, test, _ = setup
    out, kept = tmp_path / "scores", tmp_path / "kept"
    kw = {**KW, **{k: v for k, v in kwargs.items() if k != "method"}}
    with pytest.raises(FastinfError, match=match):
        score_while_extracting(model, tok, ds, test, kwargs["method"], out=out, keep_store=kept, **kw)
    assert not out.exists() and not kept.exists()


def test_preconditioner_for_a_method_without_curvature_is_refused(setup, tmp_path):
    root, model, tok, ds, test, train = setup
    with pytest.raises(ConfigError, match="no curvature"):
        score_while_extracting(model, tok, ds, test, "graddot", preconditioner_from=train, out=tmp_path / "o", **KW)
    assert not (tmp_path / "o").exists()


def test_another_model_than_the_test_stores_is_refused(setup, tmp_path):
    root, _, tok, ds, test, _ = setup
    other = make_model("bert", seed=5)
    with pytest.raises(StoreMismatchError, match="not the one the test store"):
        score_while_extracting(other, tok, ds, test, out=tmp_path / "o", keep_store=tmp_path / "k", **KW)
    assert not (tmp_path / "o").exists() and not (tmp_path / "k").exists()


def test_a_file_as_output_is_refused(setup, tmp_path):
    root, model, tok, ds, test, _ = setup
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        score_while_extracting(model, tok, ds, test, out=f, **KW)
    assert f.read_text() == "mine"


def test_cli_refuses_conflicting_flags_with_exit_2(setup, tmp_path, capsys):
    root, *_ = setup
    base = ["score", "--test", str(root / "test"), "--method", "graddot", "--out", str(tmp_path / "o")]
    cases = [([*base, "--train-data", "x.jsonl", "--train", str(root / "train"), "--model", "m"], "drop --train"),
             ([*base, "--train-data", "x.jsonl"], "--model"),
             ([*base, "--train-data", "x.jsonl", "--model", "m", "--batch-size", "0"], "--batch-size"),
             ([*base, "--train-data", "x.jsonl", "--model", "m", "--aggregate", "rank"], "aggregate")]
    for argv, match in cases:
        assert fastinf_main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") <= 2, err
    assert not (tmp_path / "o").exists()
