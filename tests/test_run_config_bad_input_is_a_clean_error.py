"""A run config that is not UTF-8, not YAML or not a mapping, a bad `--set`, or bad `demo` flags is a
one-line ConfigError naming the file or flag (the CLI: exit 2, no traceback), and nothing is written."""
from __future__ import annotations

import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.experiment.config import RunConfig

BAD_FILES = {
    "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    "list.yaml": (b"- data\n- model\n", "must be a mapping"),
    "scalar.yaml": (b"42\n", "must be a mapping"),
    "broken.yaml": (b"train: [1, 2\n", "not valid YAML"),
    "binary.yaml": (b"\x00\x01\x02\xff\xfe", "not UTF-8"),
    "section.yaml": (b"train: 3\n", "train must be a mapping"),
}


def _fails(capsys, argv, *needles):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_config_file_is_named_by_the_api_run_and_train(tmp_path, capsys, name):
    raw, needle = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_yaml(path)
    _fails(capsys, ["run", path, "--out", tmp_path / "out"], needle)
    _fails(capsys, ["train", "--config", path, "--out", tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("item,needle", [
    ("train.epochs=[1", "not valid YAML"), ("train.epochs", "KEY=VALUE"), ("seeds.x=1", "seeds must be a list"),
    ("train.epocs=2", "train.epocs"), ("train.epochs=two", "integer"),
])
def test_bad_set_override_is_named(tmp_path, capsys, item, needle):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("name: x\n")
    _fails(capsys, ["run", cfg, "--out", tmp_path / "out", "--set", item], needle)
    assert not (tmp_path / "out").exists()


def test_demo_seeds_must_be_integers(tmp_path, capsys):
    _fails(capsys, ["demo", "--out", tmp_path / "d", "--seeds", "0,one"], "--seeds")
    assert not (tmp_path / "d").exists()
