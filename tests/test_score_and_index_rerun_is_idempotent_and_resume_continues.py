"""``fastinf score`` and ``fastinf index build`` behave like ``extract``: a rerun of the same command on a
finished result recomputes nothing (prints the summary, files untouched), ``--resume`` continues an
interrupted run and gives the same bytes as an uninterrupted one, and a different request is refused
naming the difference."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError, StoreError
from fastinf.scoring import scores as scores_mod
from fastinf.scoring.estimators import score
from fastinf.scoring.scores import ScoreSet
from fastinf.store import GradientStore


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    dims = {"u0": 8, "u1": 4, "u2": 6}
    train = GradientStore.from_arrays(tmp_path / "train", {u: rng.standard_normal((20, k)).astype(np.float32)
                                                           for u, k in dims.items()})
    test = GradientStore.from_arrays(tmp_path / "test", {u: rng.standard_normal((4, k)).astype(np.float32)
                                                         for u, k in dims.items()})
    return train, test


def _files(path):
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _score_args(train, test, out, *extra):
    return ["score", "--train", str(train.path), "--test", str(test.path), "--method", "if", "--out", str(out),
            "--no-progress", *extra]


def test_score_rerun_of_the_same_command_is_a_no_op(tmp_path, stores, capsys):
    train, test = stores
    out = tmp_path / "s"
    assert main(_score_args(train, test, out, "--parquet", str(tmp_path / "top.parquet"))) == 0
    assert capsys.readouterr().out.startswith("wrote if scores")
    before = _files(out)
    assert main(_score_args(train, test, out, "--parquet", str(tmp_path / "top.parquet"))) == 0
    assert "already complete (nothing recomputed)" in capsys.readouterr().out
    assert _files(out) == before


@pytest.mark.parametrize("change, field", [(["--damping", "1e-2"], "params.damping"),
                                           (["--layers", "u0"], "unit_names")])
def test_score_rerun_with_different_arguments_is_refused_naming_the_difference(tmp_path, stores, capsys,
                                                                                change, field):
    train, test = stores
    out = tmp_path / "s"
    assert main(_score_args(train, test, out)) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(_score_args(train, test, out, *change)) == 2
    err = capsys.readouterr().err
    assert field in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _files(out) == before
    assert main(_score_args(train, test, out, *change, "--overwrite")) == 0


def _interrupted(monkeypatch, train, test, out, after):
    """A score run killed after ``after`` finished parts (as SIGKILL leaves it: no cleanup)."""
    calls = {"n": 0}
    real = scores_mod.ScoreSetWriter.mark_done

    def mark_then_die(self, ui, part):
        real(self, ui, part)
        calls["n"] += 1
        if calls["n"] == after:
            raise RuntimeError("killed")

    monkeypatch.setattr(scores_mod.ScoreSetWriter, "mark_done", mark_then_die)
    monkeypatch.setattr(scores_mod.ScoreSetWriter, "abort", lambda self: self.close())
    with pytest.raises(RuntimeError, match="killed"):
        score(test, train, "if", out=out)
    monkeypatch.undo()


def test_score_resume_continues_an_interrupted_run_byte_identically(tmp_path, stores, monkeypatch, capsys):
    train, test = stores
    ref = score(test, train, "if", out=tmp_path / "ref")
    out = tmp_path / "s"
    _interrupted(monkeypatch, train, test, out, after=2)
    with pytest.raises(StoreError, match="incomplete"):
        ScoreSet.open(out)
    assert main(_score_args(train, test, out)) == 2            # a plain rerun says what to do
    assert "--resume" in capsys.readouterr().err
    written = []
    real = scores_mod.ScoreSetWriter.write
    monkeypatch.setattr(scores_mod.ScoreSetWriter, "write", lambda self, ui, *a: (written.append(ui), real(self, ui, *a)))
    assert main(_score_args(train, test, out, "--resume")) == 0
    assert set(written) == {2}                                   # units 0 and 1 were kept, not recomputed
    s = ScoreSet.open(out)
    assert s.verify() == [] and not (out / "progress").exists()
    for name in ref.unit_names:
        assert s.unit_scores(name).tobytes() == ref.unit_scores(name).tobytes()


def test_score_resume_of_a_different_request_is_refused(tmp_path, stores, monkeypatch):
    train, test = stores
    out = tmp_path / "s"
    _interrupted(monkeypatch, train, test, out, after=1)
    with pytest.raises(ConfigError, match="params.damping"):
        score(test, train, "if", out=out, resume=True, damping=0.5)
    assert (out / "progress").is_dir()                           # the interrupted run is kept, resumable
    assert score(test, train, "if", out=out, resume=True).verify() == []


def test_index_rerun_is_a_no_op_and_a_different_request_is_refused(tmp_path, stores, capsys):
    train, _ = stores
    out = tmp_path / "idx"
    args = ["index", "build", str(train.path), "--out", str(out), "--backend", "exact"]
    assert main(args) == 0
    before = _files(out)
    assert main(args) == 0
    assert _files(out) == before
    capsys.readouterr()
    assert main([*args, "--method", "gradcos"]) == 2
    err = capsys.readouterr().err
    assert "method" in err and "--overwrite" in err and _files(out) == before
    assert main([*args, "--method", "gradcos", "--overwrite"]) == 0


def test_a_rerun_after_a_kill_between_finalize_and_the_record_writes_the_record(tmp_path):
    """Found by tests/scripts/fault_inject.py: a score killed after its score set was complete but before
    score_config.json was written must get its record on the rerun (the set itself is not recomputed)."""
    import json

    import numpy as np

    from fastinf.cli import main
    from fastinf.store import GradientStore

    rng = np.random.default_rng(0)
    tr = GradientStore.from_arrays(tmp_path / "tr", {"u": rng.standard_normal((20, 4)).astype(np.float32)})
    te = GradientStore.from_arrays(tmp_path / "te", {"u": rng.standard_normal((3, 4)).astype(np.float32)})
    out = tmp_path / "s"
    argv = ["score", "--train", str(tr.path), "--test", str(te.path), "--method", "graddot", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    (out / "score_config.json").unlink()          # as if killed right after finalize
    before = (out / "units").stat().st_mtime_ns if (out / "units").exists() else None
    assert main(argv) == 0
    assert json.loads((out / "score_config.json").read_text())["command"] == "score"
    if before is not None:
        assert (out / "units").stat().st_mtime_ns == before
