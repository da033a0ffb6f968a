"""Curvature-aware projections at full rank equal their dense float64 definitions: the eigenbasis (pca)
projection preserves inner products exactly, kfac scores equal ``vec(∇W_q)ᵀ(A_λ⁻¹ ⊗ S_λ⁻¹)vec(∇W_g)`` and
ekfac scores equal the dense EK-FAC solve; pcamix is unbiased with an exact top subspace; stores of other
factors, factors of another model, oversized projections and mismatched methods are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError, StoreMismatchError
from fastinf.extraction.extract import extract
from fastinf.extraction.factors import fit_factors
from fastinf.extraction.projection import ProjectionSpec, UnitProjector
from fastinf.scoring.estimators import score
from tests._models import make_model
from tests._reference import per_sample_exact
from tests._tokenizer import random_texts, tiny_tokenizer

LAYERS = "attn.v"          # two 16 x (16 + bias) units: full rank is 16x17
KW = dict(layers=LAYERS, batch_size=4, max_length=12, progress=False, dtype="fp32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("curv")
    tok = tiny_tokenizer(root / "tok")
    rng = np.random.default_rng(0)
    train = TextDataset(texts=random_texts(14, 0, max_len=10), labels=rng.integers(0, 3, 14), name="train")
    test = TextDataset(texts=random_texts(5, 1, max_len=10), labels=rng.integers(0, 3, 5), name="test")
    model = make_model("bert")
    factors = fit_factors(model, tok, train, root / "factors", layers=LAYERS, batch_size=4, max_length=12,
                          progress=False)
    return root, tok, model, train, test, factors


def _stores(setup, proj: str):
    root, tok, model, train, test, factors = setup
    spec = ProjectionSpec.parse(proj, factors=None if proj == "exact" else factors.path)
    tag = proj.replace("@", "_")
    out = [extract(model, tok, ds, root / f"{tag}-{n}", proj=spec, overwrite=True, **KW)
           for n, ds in (("test", test), ("train", train))]
    return out


def _exact_grads(setup, ds):
    """unit name -> [N, d_out, d_in + 1] float64 per-sample ∇W̃ = [∇W, ∇b] (unpadded single-sample backward)."""
    _, tok, model, *_ = setup
    from fastinf.extraction.units import discover, select

    units = select(discover(model), LAYERS)
    enc = tok(ds.texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "token_type_ids": enc["token_type_ids"], "labels": torch.as_tensor(ds.labels)}
    flat = per_sample_exact(model, units, batch)
    out = {}
    for u in units:
        f = flat[u.name].numpy()
        w, b = f[:, :u.d_out * u.d_in].reshape(-1, u.d_out, u.d_in), f[:, u.d_out * u.d_in:]
        out[u.name] = np.concatenate([w, b[:, :, None]], axis=2)
    return out


def _close(got, want, rtol=2e-4):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rtol * scale, f"max error {np.abs(got - want).max():.3g} vs scale {scale:.3g}"


def test_full_rank_eigenbasis_projection_preserves_inner_products(setup):
    q, g = _stores(setup, "pca16x17")
    qe, ge = _stores(setup, "exact")
    a, b = score(q, g, "graddot"), score(qe, ge, "graddot")
    for name in a.unit_names:
        _close(np.asarray(a.unit_scores(name)), np.asarray(b.unit_scores(name)), rtol=1e-5)


def test_full_rank_kfac_equals_dense_kronecker_inverse(setup):
    *_, train, test, factors = setup
    q, g = _stores(setup, "kfac16x17")
    got = score(q, g, "kfac")
    Gq, Gg = _exact_grads(setup, test), _exact_grads(setup, train)
    for name in got.unit_names:
        uf = factors.unit(name)
        lam_a, lam_s = 0.1 * np.trace(uf.A) / len(uf.A), 0.1 * np.trace(uf.S) / len(uf.S)
        a_inv = np.linalg.inv(uf.A + lam_a * np.eye(len(uf.A)))
        s_inv = np.linalg.inv(uf.S + lam_s * np.eye(len(uf.S)))
        dense = np.kron(s_inv, a_inv)                       # row-major vec(∇W̃): (A⁻¹ ⊗ S⁻¹) in column-major terms
        want = Gq[name].reshape(len(test), -1) @ dense @ Gg[name].reshape(len(train), -1).T
        _close(np.asarray(got.unit_scores(name), np.float64), want)


def test_full_rank_ekfac_equals_dense_eigenvalue_corrected_solve(setup):
    *_, train, test, factors = setup
    q, g = _stores(setup, "pca16x17")
    got = score(q, g, "ekfac")
    Gq, Gg = _exact_grads(setup, test), _exact_grads(setup, train)
    for name in got.unit_names:
        uf = factors.unit(name)
        basis = np.kron(uf.s_evecs, uf.a_evecs)            # columns: eigenvectors of A ⊗ S, row-major vec
        coords = Gg[name].reshape(len(train), -1) @ basis
        lam_diag = (coords ** 2).mean(0)                     # Λ = E[φ²], the eigenvalue correction
        lam = 0.1 * lam_diag.mean()
        H = basis @ np.diag(lam_diag) @ basis.T + lam * np.eye(len(basis))
        want = Gq[name].reshape(len(test), -1) @ np.linalg.solve(H, Gg[name].reshape(len(train), -1).T)
        _close(np.asarray(got.unit_scores(name), np.float64), want)


def test_pcamix_keeps_the_top_eigenvectors_and_is_unbiased_elsewhere(setup):
    *_, factors = setup
    u = factors.units[0]
    rows = []
    for seed in range(200):
        spec = ProjectionSpec.parse("pcamix6x8", seed=seed, factors=factors.path)
        rows.append(UnitProjector(u, spec, dtype=torch.float64).P_out.numpy())
    top = factors.unit(u.name).s_evecs[:, :3].T
    np.testing.assert_allclose(rows[0][:3], top, atol=1e-12)
    np.testing.assert_allclose(rows[0][3:] @ top.T, 0.0, atol=1e-12)          # complement is orthogonal to it
    mean_ptp = np.mean([p.T @ p for p in rows], axis=0)
    assert np.abs(mean_ptp - np.eye(u.d_out)).max() < 0.35, "E[PᵀP] should be I (unbiased inner products)"


def test_curvature_bad_input_is_refused_before_any_store_is_written(setup, tmp_path):
    root, tok, model, train, test, factors = setup
    with pytest.raises(ConfigError, match="needs a factor set"):
        ProjectionSpec.parse("pca16x16")
    with pytest.raises(ConfigError, match="no factor set"):
        ProjectionSpec.parse("pca16x16", factors=tmp_path / "none")
    with pytest.raises(ConfigError, match="another model"):
        extract(make_model("bert", seed=3), tok, test, tmp_path / "s1", proj=f"pca8x8@{factors.path}", **KW)
    with pytest.raises(ConfigError, match="larger than"):
        extract(model, tok, test, tmp_path / "s2", proj=f"pca32x32@{factors.path}", **KW)
    with pytest.raises(ConfigError, match="lack"):
        extract(model, tok, test, tmp_path / "s3", proj=f"pca8x8@{factors.path}",
                **{**KW, "layers": "attn.q"})
    assert not any((tmp_path / f"s{i}").exists() and any((tmp_path / f"s{i}").iterdir()) for i in (1, 2, 3))
    other = fit_factors(model, tok, train.subset(range(7)), root / "factors-other", layers=LAYERS, batch_size=4,
                        max_length=12, progress=False)
    assert other.fingerprint != factors.fingerprint
    q = extract(model, tok, test, tmp_path / "q", proj=f"pca8x8@{other.path}", **KW)
    _, g = _stores(setup, "pca8x8@" + str(factors.path))
    with pytest.raises(StoreMismatchError, match="projections"):
        score(q, g, "graddot")
    qk, gk = _stores(setup, "kfac8x8@" + str(factors.path))
    with pytest.raises(StoreMismatchError, match="pca projection"):
        score(qk, gk, "ekfac")
    with pytest.raises(StoreMismatchError, match="kfac projection"):
        score(q, q, "kfac")


def test_spec_round_trip_records_factors_by_fingerprint(setup):
    *_, factors = setup
    s = ProjectionSpec.parse("kfac4x6", seed=2, factors=factors.path, damping="rel:0.5")
    d = s.to_dict()
    assert d == {"kind": "kfac", "k_out": 4, "k_in": 6, "seed": 2, "factors": factors.fingerprint,
                 "damping": "rel:0.5"} and str(s) == "kfac4x6"
    assert ProjectionSpec.from_dict(d, factors=str(factors.path)) == s
    assert ProjectionSpec.parse(f"pca4x6@{factors.path}") == ProjectionSpec.parse("pca4x6", factors=factors.path)
    with pytest.raises(ConfigError, match="kfac projection only"):
        ProjectionSpec.parse("pca4x4", factors=factors.path, damping=1e-3)
