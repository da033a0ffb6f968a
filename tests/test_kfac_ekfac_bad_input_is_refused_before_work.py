"""Invariant: kfac / ekfac requests that cannot be right fail with one clear error before any output is written:
kfac on a store not extracted with the kfac projection, ekfac on a store without an eigenbasis (pca)
projection, on every path (score, fused, dist_score, stream, index); factors of another model / data (the
``--factors`` check and re-projecting a store with other factors); a projection larger than a unit's dims."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.cli.app import main as fastinf_main
from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError, StoreMismatchError
from fastinf.extraction.extract import extract
from fastinf.extraction.factors import fit_factors
from fastinf.extraction.factors_proj import check_store_factors
from fastinf.extraction.projection_spec import store_spec
from fastinf.retrieval.build import build_index
from fastinf.scoring.dist_score import score_distributed
from fastinf.scoring.estimators import score
from fastinf.scoring.extract_score import score_while_extracting
from fastinf.scoring.fused import influence
from tests._models import NUM_LABELS, make_model
from tests._tokenizer import random_texts, tiny_tokenizer

LAYERS = "attn.v"
KW = dict(layers=LAYERS, batch_size=8, max_length=12, progress=False, dtype="fp32")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfac-bad")
    model, tok = make_model("bert"), tiny_tokenizer(root / "tok")
    rng = np.random.default_rng(1)
    train = TextDataset(random_texts(12, 2, max_len=10), labels=rng.integers(0, NUM_LABELS, 12), name="train")
    other = TextDataset(random_texts(12, 3, max_len=10), labels=rng.integers(0, NUM_LABELS, 12), name="other")
    f = fit_factors(model, tok, train, root / "factors", layers=LAYERS, batch_size=8, max_length=12, progress=False)
    g = fit_factors(model, tok, other, root / "factors-other", layers=LAYERS, batch_size=8, max_length=12,
                    progress=False)
    stores = {proj: extract(model, tok, train, root / proj.split("@")[0], proj=proj, **KW)
              for proj in ("4x4", f"pca4x4@{f.path}", f"kfac4x4@{f.path}")}
    return root, model, tok, train, f, g, {k.split("@")[0]: v for k, v in stores.items()}


@pytest.mark.parametrize("method,proj,kind", [("kfac", "pca4x4", "kfac"), ("kfac", "4x4", "kfac"),
                                              ("ekfac", "4x4", "pca"), ("ekfac", "kfac4x4", "pca")])
def test_wrong_projection_is_refused_on_every_path(env, tmp_path, method, proj, kind):
    root, model, tok, train_ds, f, _, stores = env
    s = stores[proj]
    match = f"needs stores extracted with the {kind} projection"
    calls = [lambda: score(s, s, method, out=tmp_path / "a"),
             lambda: influence(s, s, method, ["rank"], {"all": "all"}, out=tmp_path / "b.parquet"),
             lambda: score_distributed(s, s, method, out=tmp_path / "c"),
             lambda: build_index(s, method=method, out=tmp_path / "d"),
             lambda: score_while_extracting(model, tok, train_ds, s, method, out=tmp_path / "e",
                                            factors=None if proj == "4x4" else f.path,
                                            preconditioner_from=s if method == "ekfac" else None)]
    for call in calls:
        with pytest.raises(StoreMismatchError, match=match):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_curvature_store_without_its_factors_cannot_be_reprojected(env, tmp_path):
    root, model, tok, train_ds, f, g, stores = env
    with pytest.raises(ConfigError, match="pass the factor directory"):
        store_spec(stores["kfac4x4"])
    with pytest.raises(ConfigError, match="not the ones recorded"):
        store_spec(stores["kfac4x4"], g.path)                      # factors of other data
    with pytest.raises(ConfigError, match="drop --factors"):
        store_spec(stores["4x4"], f.path)
    with pytest.raises(ConfigError, match="pass the factor directory"):
        score_while_extracting(model, tok, train_ds, stores["kfac4x4"], "kfac", out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_factors_flag_refuses_stores_of_other_factors(env, tmp_path, capsys):
    root, _, _, _, f, g, stores = env
    check_store_factors(f.path, stores["kfac4x4"], stores["pca4x4"])          # the right ones pass
    with pytest.raises(ConfigError, match="another model, data or refit"):
        check_store_factors(g.path, stores["kfac4x4"])
    with pytest.raises(ConfigError, match="not one built from factors"):
        check_store_factors(f.path, stores["4x4"])
    s = str(stores["pca4x4"].path)
    for extra in ([], ["--aggregate", "rank"]):
        out = tmp_path / ("agg.parquet" if extra else "scores")
        rc = fastinf_main(["score", "--method", "ekfac", "--test", s, "--train", s, "--out", str(out),
                           "--factors", str(g.path), *extra])
        assert rc != 0 and "another model, data or refit" in capsys.readouterr().err
        assert not out.exists()
    rc = fastinf_main(["index", "build", s, "--method", "ekfac", "--factors", str(g.path), "--out",
                       str(tmp_path / "idx")])
    assert rc != 0 and "another model, data or refit" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_kfac_damping_and_oversized_projections_are_refused(env, tmp_path):
    root, model, tok, train_ds, f, _, stores = env
    s = stores["kfac4x4"]
    with pytest.raises(ConfigError, match="damping"):
        score(s, s, "kfac", damping=1e-3, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="damping"):
        score_distributed(s, s, "kfac", damping=1e-3, out=tmp_path / "b")
    with pytest.raises(ConfigError, match="larger than"):
        extract(model, tok, train_ds, tmp_path / "big", proj=f"kfac64x64@{f.path}", **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
