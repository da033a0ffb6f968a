"""`fastinf run` writes only into a new, empty or own run directory (created owner-only); `--overwrite`
clears only a run directory fastinf wrote (refusing, before any work and naming it, anything else — inside
`seed-<s>/` too); the run's lock is taken before anything is removed; and a rerun of a finished run is a
no-op that changes no file."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import yaml

from fastinf.cli.app import main
from fastinf.errors import ConfigError, StoreLockedError
from fastinf.experiment.config import RunConfig
from fastinf.experiment.pipeline import run_experiment
from test_pipeline import tiny_config


def _small(root: Path) -> dict:
    d = tiny_config(root)
    d["score"] = {"methods": ["graddot"]}
    d["aggregate"] = {"how": ["mean", "rank"], "groups": ["first", "all"]}
    d["extract"]["cost_repeats"] = 0
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (out = <root>/run) and its config file."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rundir")
    data = _small(root)
    (root / "config.yaml").write_text(yaml.safe_dump(data))
    run_experiment(RunConfig.from_dict(data))
    yield root, data
    torch.set_num_threads(n)


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*"))
            if p.is_file()}


def _fails(capsys, argv, *needles):
    capsys.readouterr()                                         # what earlier commands printed
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_run_directory_is_owner_only_and_marked(finished):
    root, _ = finished
    out = root / "run"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "run.json").is_file() and not (out / "locks").exists()


def test_rerun_of_a_finished_run_changes_nothing(finished, capsys):
    root, _ = finished
    out = root / "run"
    before = _snapshot(out)
    time.sleep(0.01)
    assert main(["run", str(root / "config.yaml"), "--no-progress"]) == 0
    assert "; ran 0" in capsys.readouterr().out
    assert _snapshot(out) == before, "a rerun of a finished run rewrote files"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_directory_is_refused_before_any_work(finished, tmp_path, capsys, monkeypatch, overwrite):
    import fastinf.experiment.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_splits", lambda *_: pytest.fail("data loaded before the out dir check"))
    root, _ = finished
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    (mine / "config.yaml").write_text("my own config\n")
    _fails(capsys, ["run", root / "config.yaml", "--out", mine, *(["--overwrite"] if overwrite else [])],
           "thesis.tex", "never")
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "thesis.tex"]
    assert (mine / "config.yaml").read_text() == "my own config\n"


def test_overwrite_refuses_a_run_directory_holding_a_foreign_file_even_in_a_seed_dir(finished, tmp_path, capsys):
    import shutil

    root, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(root / "run", copy)
    (copy / "seed-0" / "notes.txt").write_text("mine")
    _fails(capsys, ["run", root / "config.yaml", "--out", copy, "--overwrite"], "seed-0/notes.txt")
    assert (copy / "seed-0" / "notes.txt").read_text() == "mine" and (copy / "seed-0" / "stores").is_dir()
    res = run_experiment(RunConfig.from_dict(finished[1]), copy)     # a plain rerun only writes its own names
    assert res.stages_run == [] and (copy / "seed-0" / "notes.txt").read_text() == "mine"
    (copy / "seed-0" / "notes.txt").unlink()
    (copy / "README.md").write_text("mine")
    _fails(capsys, ["run", root / "config.yaml", "--out", copy, "--overwrite"], "README.md")
    assert (copy / "README.md").exists() and (copy / "report.md").exists()
    (copy / "data.txt").write_text("x")
    (copy / "README.md").unlink()
    with pytest.raises(ConfigError, match="data.txt"):
        run_experiment(RunConfig.from_dict(finished[1]), copy, overwrite=True)


def test_overwrite_of_a_file_or_a_parent_of_stores_is_refused(finished, tmp_path, capsys):
    root, _ = finished
    f = tmp_path / "afile"
    f.write_text("mine")
    _fails(capsys, ["run", root / "config.yaml", "--out", f, "--overwrite"], "is a file")
    assert f.read_text() == "mine"
    _fails(capsys, ["run", root / "config.yaml", "--out", root, "--overwrite"], "never deletes")
    assert (root / "run" / "report.md").exists() and (root / "bert").is_dir()


def test_a_live_lock_refuses_overwrite_before_anything_is_removed(finished, tmp_path):
    import shutil
    import socket

    root, data = finished
    copy = tmp_path / "locked"
    shutil.copytree(root / "run", copy)
    (copy / "locks").mkdir()
    (copy / "locks" / "run.lock").write_text(f"{os.getppid()} {socket.gethostname()} 0\n")   # a live process
    before = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*"))
    with pytest.raises(StoreLockedError, match="another process"):
        run_experiment(RunConfig.from_dict(data), copy, overwrite=True)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == before


def test_overwrite_of_its_own_run_starts_over(finished, tmp_path):
    import shutil

    root, data = finished
    copy = tmp_path / "own"
    shutil.copytree(root / "run", copy)
    (copy / "seed-0" / "extract_train.done.json").unlink()        # would otherwise resume from here
    res = run_experiment(RunConfig.from_dict(data), copy, overwrite=True)
    assert "seed-0/noise" in res.stages_run and "seed-0/train" in res.stages_run and not res.stages_cached
    assert (copy / "report.md").is_file() and (copy / "run.json").is_file()


def test_a_stale_lock_of_a_killed_run_is_taken_over(finished, tmp_path):
    import shutil
    import socket
    import subprocess
    import sys

    root, data = finished
    copy = tmp_path / "stale"
    shutil.copytree(root / "run", copy)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (copy / "locks").mkdir()
    (copy / "locks" / "run.lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()} 0\n")
    res = run_experiment(RunConfig.from_dict(data), copy)
    assert res.stages_run == [] and not (copy / "locks").exists()


def test_a_run_directory_written_before_the_marker_is_adopted(finished, tmp_path):
    import shutil

    root, data = finished
    copy = tmp_path / "legacy"
    shutil.copytree(root / "run", copy)
    (copy / "run.json").unlink()
    res = run_experiment(RunConfig.from_dict(data), copy)
    assert res.stages_run == [] and (copy / "run.json").is_file()
