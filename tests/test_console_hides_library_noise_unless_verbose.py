"""The CLI keeps library noise out of the way: a `fastinf train` of a headless tiny model (transformers prints a
"LOAD REPORT ... MISSING" table for the new head, peft a FutureWarning) prints fastinf's one-line notice and
no table, no FutureWarning, no "Loading weights" bar by default, and all of it with --verbose. The quieting is
scoped: afterwards the caller's warning filters and transformers' verbosity are what they were. Every
command accepts --quiet and --no-progress (and --json where it has a machine-readable result)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from fastinf.cli.app import build_parser
from tests._hf_dirs import save_tiny
from tests._tokenizer import random_texts
from tests.test_public_api_and_cli_help import CLI_COMMANDS

NO_JSON = {"demo"}          # prints a report table only


@pytest.fixture(scope="module")
def train_cmd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    model = save_tiny(tmp / "headless", "headless")
    data = tmp / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(random_texts(24, 4))))
    return [sys.executable, "-m", "fastinf", "train", "--model", str(model), "--data", str(data), "--epochs", "1",
            "--batch-size", "8", "--max-length", "16", "--lora-targets", "query,value"], tmp


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_train_prints_one_notice_and_no_library_noise_by_default(train_cmd):
    cmd, tmp = train_cmd
    out = _run(cmd + ["--out", str(tmp / "quiet"), "--no-progress"])
    assert "LOAD REPORT" not in out and "MISSING" not in out, out
    assert "FutureWarning" not in out and "Loading weights" not in out, out
    notes = [line for line in out.splitlines() if line.startswith("fastinf: ")]
    assert len(notes) == 1 and "classifier" in notes[0], out
    assert "scored checkpoint" in out


def test_verbose_brings_the_library_output_back(train_cmd):
    cmd, tmp = train_cmd
    out = _run(cmd + ["--out", str(tmp / "verbose"), "--verbose"])
    assert "LOAD REPORT" in out and "MISSING" in out, out[-3000:]
    assert "FutureWarning" in out, out[-3000:]


def test_quiet_prints_nothing(train_cmd):
    cmd, tmp = train_cmd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(cmd + ["--out", str(tmp / "q"), "--quiet"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "" and "train epoch" not in res.stderr, (res.stdout, res.stderr[-2000:])


def test_the_quieting_is_scoped_to_fastinf_calls():
    import transformers.utils.logging as tl

    from fastinf.libquiet import quiet_libraries

    before_filters, before_level = list(warnings.filters), tl.get_verbosity()
    with quiet_libraries():
        assert tl.get_verbosity() == tl.ERROR
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")           # the user's filter inside the body is kept ...
            warnings.warn_explicit("lib", FutureWarning, "x.py", 1, module="transformers.x")
        assert [str(w.message) for w in seen] == ["lib"]
    assert warnings.filters == before_filters and tl.get_verbosity() == before_level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn_explicit("lib", FutureWarning, "x.py", 1, module="transformers.x")
            warnings.warn_explicit("mine", FutureWarning, "y.py", 1, module="user_code")
        warnings.warn_explicit("lib", FutureWarning, "x.py", 2, module="transformers.x")
    assert [str(w.message) for w in seen] == ["mine", "lib"]


def _leaves(parser):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for p in dict.fromkeys(a.choices.values()) for leaf in _leaves(p)]


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_command_accepts_quiet_no_progress_and_json(command):
    top = build_parser()
    sub = next(a for a in top._actions if a.dest == "command").choices[command]
    for leaf in _leaves(sub):
        flags = leaf._option_string_actions
        assert {"--quiet", "--no-progress", "--verbose"} <= set(flags), (command, leaf.prog)
        if command not in NO_JSON:
            assert "--json" in flags, (command, leaf.prog)
