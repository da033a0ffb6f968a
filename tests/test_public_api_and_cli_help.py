"""Every public name of ``fastinf.__all__`` imports, and every CLI command answers ``--help``.

Pins the layout change: modules moved into stage subpackages, but ``fastinf.X`` and the CLI stay as they were.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import fastinf
from fastinf.cli.app import COMMANDS, build_parser

CLI_COMMANDS = ["layers", "extract", "store", "score", "demo", "aggregate", "ndr", "index", "search", "train",
                "run", "plan", "factors", "lds", "curate"]


@pytest.mark.parametrize("name", fastinf.__all__)
def test_public_name_imports(name: str) -> None:
    value = getattr(fastinf, name)
    assert value is not None
    if name != "__version__":
        assert getattr(value, "__module__", "").startswith("fastinf."), (name, value)


def test_public_functions_are_functions_not_modules() -> None:
    """``fastinf.extract`` / ``aggregate`` / ``plan`` / ``score`` / ``search`` are the functions even after
    importing every subpackage (no module shadows a public name)."""
    import fastinf.aggregation.aggregate  # noqa: F401
    import fastinf.extraction.extract  # noqa: F401
    import fastinf.extraction.plan  # noqa: F401
    import fastinf.retrieval.index  # noqa: F401
    import fastinf.scoring.estimators  # noqa: F401

    for name in ("extract", "aggregate", "plan", "score", "search", "ndr", "build_index"):
        assert callable(getattr(fastinf, name)) and not isinstance(getattr(fastinf, name), type(sys)), name


def test_every_registered_command_is_listed() -> None:
    assert sorted(m.rsplit(".", 1)[-1] for m in COMMANDS) == sorted(CLI_COMMANDS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(CLI_COMMANDS)


@pytest.mark.parametrize("command", [None, *CLI_COMMANDS])
def test_cli_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    from fastinf.cli import main

    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastinf"), out[:200]


@pytest.mark.parametrize("module", ["fastinf", "fastinf.dist_score", "fastinf.env"])
def test_module_entry_points_help(module: str) -> None:
    """``python -m fastinf``, ``python -m fastinf.dist_score`` (the README's torchrun line) still run."""
    args = [sys.executable, "-m", module] + ([] if module == "fastinf.env" else ["--help"])
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()
