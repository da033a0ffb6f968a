"""`fastinf train --out` writes only into a new, empty or own train directory (owner-only, marked); a rerun
with the same settings is a no-op; other settings need `--overwrite`, which replaces only a training fastinf
wrote and refuses (before any work, naming it) a directory holding anything else."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.experiment.config import ModelConfig, TrainConfig
from fastinf.experiment.train import finetune
from test_train import make_sentiment, make_tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("traindir")
    model = make_tiny_model_dir(root / "bert")
    ds = make_sentiment(40)
    data = root / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(ds.texts, ds.labels)))
    yield root, model, data
    torch.set_num_threads(n)


def _argv(setup, out, *extra):
    root, model, data = setup
    return ["train", "--model", model, "--data", str(data), "--epochs", "1", "--full", "--lr", "1e-2",
            "--max-length", "16", "--out", str(out), *extra]


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*"))
            if p.is_file()}


def _fails(capsys, argv, *needles):
    capsys.readouterr()                                         # what earlier commands printed
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_train_dir_is_owner_only_marked_and_a_rerun_is_a_no_op(setup, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(_argv(setup, out)) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and (out / "fastinf_train.json").is_file()
    assert not (out / "locks").exists()
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(setup, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before
    _fails(capsys, _argv(setup, out, "--lr", "5e-3"), "other settings", "--overwrite")
    assert _snapshot(out) == before
    assert main(_argv(setup, out, "--lr", "5e-3", "--overwrite")) == 0
    assert "lr: 0.005" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_directory_is_refused_before_training(setup, tmp_path, capsys, monkeypatch, overwrite):
    import fastinf.experiment.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_splits", lambda *_: pytest.fail("data loaded before the out check"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "ckpt-0").mkdir()
    (out / "paper.pdf").write_text("mine")
    _fails(capsys, _argv(setup, out, *(["--overwrite"] if overwrite else [])), "paper.pdf")
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-0", "paper.pdf"]


def test_an_interrupted_training_needs_overwrite_and_is_then_replaced(setup, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(_argv(setup, out)) == 0
    (out / "train.json").unlink()                               # as if killed before the end
    _fails(capsys, _argv(setup, out), "unfinished", "--overwrite")
    assert main(_argv(setup, out, "--overwrite")) == 0
    assert (out / "train.json").is_file()


def test_finetune_refuses_a_foreign_directory(setup, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        finetune(ModelConfig(name=setup[1], max_length=16), TrainConfig(epochs=1, lora=None),
                 make_sentiment(24), None, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_out_is_required_without_a_config(setup, capsys):
    root, model, data = setup
    _fails(capsys, ["train", "--model", model, "--data", str(data)], "--out is required")
