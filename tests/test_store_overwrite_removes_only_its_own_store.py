"""``overwrite=True`` / ``extract --overwrite`` replaces only a store fastinf wrote: a foreign file inside,
a directory without a store manifest, or the parent of several stores is refused (naming what is there)
and nothing is deleted; a CLI-made store (with its ``extract_config.json``) and temp files are replaced."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastinf.cli.app import main
from fastinf.errors import ConfigError
from fastinf.store import GradientStore
from fastinf.store.format import STORE_KIND
from fastinf.store.ownership import check_removable
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer


def _feats(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"u0": rng.standard_normal((n, 4)).astype(np.float32)}


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_api_overwrite_refuses_a_store_holding_a_foreign_file_and_keeps_everything(tmp_path):
    s = tmp_path / "s"
    GradientStore.from_arrays(s, _feats(), chunk_size=4)
    (s / "thesis.tex").write_text("mine")
    before = _tree(s)
    with pytest.raises(ConfigError, match="thesis.tex"):
        GradientStore.from_arrays(s, _feats(seed=1), chunk_size=4, overwrite=True)
    assert _tree(s) == before and (s / "thesis.tex").read_text() == "mine"
    assert GradientStore.open(s).verify() == []


def test_api_overwrite_of_the_parent_of_two_stores_deletes_nothing(tmp_path):
    GradientStore.from_arrays(tmp_path / "runs" / "train", _feats())
    GradientStore.from_arrays(tmp_path / "runs" / "test", _feats(seed=2))
    (tmp_path / "runs" / "notes.txt").write_text("x")
    before = _tree(tmp_path / "runs")
    with pytest.raises(ConfigError, match="never deletes"):
        GradientStore.from_arrays(tmp_path / "runs", _feats(), overwrite=True)
    assert _tree(tmp_path / "runs") == before


def test_api_overwrite_replaces_an_own_store_with_temp_files_and_derived_dirs(tmp_path):
    s = tmp_path / "s"
    GradientStore.from_arrays(s, _feats(), chunk_size=4)
    (s / "manifest.json.123.tmp").write_text("{}")           # left by a killed atomic write
    (s / "precond").mkdir()
    (s / "precond" / "0-if-x.npz").write_bytes(b"x")
    (s / "extract_config.json").write_text("{}")
    new = _feats(n=9, seed=3)
    store = GradientStore.from_arrays(s, new, chunk_size=4, overwrite=True)
    assert store.n == 9 and store.verify() == []
    assert not (s / "precond").exists() and not (s / "manifest.json.123.tmp").exists()
    np.testing.assert_array_equal(np.asarray(store.features("u0"), np.float32), new["u0"].astype(np.float16))


def test_store_kind_recognises_only_store_manifests(tmp_path):
    d = tmp_path / "scores"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"kind": "scores", "units": []}))
    with pytest.raises(ConfigError, match="not a GradientStore"):
        check_removable(d, STORE_KIND)
    assert (d / "manifest.json").exists()


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    make_model("bert").save_pretrained(root / "model")
    tiny_tokenizer(root / "tok").save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    lines = "".join(f"{t},{y}\n" for t, y in zip(random_texts(10), rng.integers(0, 3, 10)))
    (root / "d.csv").write_text("text,label\n" + lines)
    return root


def _extract(root, out, *extra):
    return main(["extract", "--model", str(root / "model"), "--data", str(root / "d.csv"), "--out", str(out),
                 "--layers", "last", "--proj", "4x4", "--max-length", "16", "--num-labels", "3", "--no-progress",
                 "--json", *extra])


def test_cli_overwrite_replaces_a_cli_made_store_but_never_a_foreign_directory(tmp_path, cli_model, capsys):
    out = tmp_path / "s"
    assert _extract(cli_model, out) == 0
    assert (out / "extract_config.json").is_file()
    assert _extract(cli_model, out, "--overwrite") == 0          # the CLI's own config file is part of the store
    assert _extract(cli_model, out) == 0                          # and a plain rerun reuses the finished store
    assert GradientStore.open(out).verify() == []
    capsys.readouterr()
    (out / "data.csv").write_text("precious")
    assert _extract(cli_model, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastinf extract: error:") and "data.csv" in err and len(err.splitlines()) == 1
    assert (out / "data.csv").read_text() == "precious" and GradientStore.open(out).verify() == []
    parent = tmp_path
    before = _tree(parent)
    assert _extract(cli_model, parent, "--overwrite") == 2        # the parent of the store: refused, untouched
    assert _tree(parent) == before
