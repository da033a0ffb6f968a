"""The factor pass: A and S equal float64 covariances of exact per-sample activations / output gradients
(one unpadded sample at a time), whatever the batch size or padding; a killed pass resumes to identical
factors; two ranks give the factors of one; bad input is refused before any work."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastinf.data.datasets import TextDataset
from fastinf.errors import ConfigError, StoreError
from fastinf.extraction.factors import fit_factors
from fastinf.extraction.factors_format import Factors
from fastinf.extraction.models import make_task
from fastinf.extraction.units import discover, get_module, select
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer

KW = dict(max_length=12, progress=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    t.model_input_names = ["input_ids", "attention_mask"]   # decoders take no token_type_ids
    return t


def _data(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return TextDataset(texts=random_texts(n, seed, max_len=10), labels=rng.integers(0, 3, n), name=f"tiny{seed}")


def reference_sums(model, tok, ds, units, max_length=12):
    """Per unit (Σ x̃x̃ᵀ or token counts, Σ ggᵀ, tokens): float64 model, one unpadded sample per backward."""
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():   # peft freezes the base weights: every unit output must reach the graph
        p.requires_grad_(True)
    task = make_task("seq-cls")
    sums = {u.name: [0.0, 0.0, 0.0] for u in units}
    for i, text in enumerate(ds.texts):
        enc = tok([text], truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "labels": torch.as_tensor(ds.labels[i:i + 1])}
        seen: dict[str, tuple] = {}

        def hook(name):
            def f(mod, inp, out):
                seen[name] = (inp[0].detach(), out)
            return f

        handles = [get_module(ref, u).register_forward_hook(hook(u.name)) for u in units]
        loss, _ = task.per_sample_loss(ref, batch)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss.sum(), [seen[u.name][1] for u in units])
        for u, g in zip(units, grads):
            x = seen[u.name][0]
            G = g.reshape(-1, u.d_out)
            if u.kind == "embedding":
                xx = torch.bincount(x.reshape(-1), minlength=u.d_in).double()
            else:
                X = x.reshape(-1, u.d_in)
                X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) if u.bias else X
                xx = X.T @ X
            s = sums[u.name]
            s[0], s[1], s[2] = s[0] + xx, s[1] + G.T @ G, s[2] + (len(G) if u.kind != "embedding" else x.numel())
    return sums


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "bert-lora"])
def test_factors_equal_float64_covariances_of_exact_per_sample_quantities(tmp_path, tok, family):
    model = make_model(family).double()
    ds = _data()
    f = fit_factors(model, tok, ds, tmp_path / "f", batch_size=4, chunk_size=5, **KW)
    units = select(discover(model), "all")
    assert f.unit_names == [u.name for u in units]
    ref = reference_sums(model, tok, ds, units)
    for u in units:
        uf = f.unit(u.name)
        xx, gg, tokens = ref[u.name]
        assert uf.samples == len(ds) and uf.tokens == tokens, (u.name, uf.tokens, tokens)
        np.testing.assert_allclose(uf.S, (gg / len(ds)).numpy(), rtol=1e-9, atol=1e-14, err_msg=u.name)
        got_a = uf.a_diag if u.kind == "embedding" else uf.A
        np.testing.assert_allclose(got_a, (xx / tokens).numpy(), rtol=1e-9, atol=1e-14, err_msg=u.name)
        if u.kind != "embedding":   # eigenpairs reconstruct A, descending
            assert np.all(np.diff(uf.a_evals) <= 1e-12)
            np.testing.assert_allclose((uf.a_evecs * uf.a_evals) @ uf.a_evecs.T, uf.A, atol=1e-10 * uf.a_evals[0])
        np.testing.assert_allclose((uf.s_evecs * uf.s_evals) @ uf.s_evecs.T, uf.S, atol=1e-10 * max(uf.s_evals[0], 1e-30))
    lora = [u for u in units if u.kind in ("lora_a", "lora_b")]
    assert (family == "bert-lora") == bool(lora)


def test_factors_do_not_depend_on_batch_size_or_padding(tmp_path, tok):
    model = make_model("bert").double()
    ds = _data(11, seed=1)
    a = fit_factors(model, tok, ds, tmp_path / "a", batch_size=1, chunk_size=11, **KW)
    b = fit_factors(model, tok, ds, tmp_path / "b", batch_size=5, chunk_size=4, **KW)
    for name in a.unit_names:
        ua, ub = a.unit(name), b.unit(name)
        np.testing.assert_allclose(ub.S, ua.S, rtol=1e-10, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(ub.A if ub.A is not None else ub.a_diag,
                                   ua.A if ua.A is not None else ua.a_diag, rtol=1e-10, atol=1e-15, err_msg=name)


def _arrays(f: Factors) -> dict:
    return {(n, k): v for n in f.unit_names for k, v in vars(f.unit(n)).items() if isinstance(v, np.ndarray)}


def test_killed_pass_resumes_to_identical_factors(tmp_path, tok, monkeypatch):
    import fastinf.extraction.factors as factors_mod

    model = make_model("bert")
    ds = _data(10, seed=2)
    kw = dict(batch_size=3, chunk_size=3, **KW)
    full = fit_factors(model, tok, ds, tmp_path / "full", **kw)
    real, calls = factors_mod._chunk_sums, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(factors_mod, "_chunk_sums", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, tok, ds, tmp_path / "cut", **kw)
    monkeypatch.setattr(factors_mod, "_chunk_sums", real)
    with pytest.raises(StoreError, match="incomplete"):
        Factors.open(tmp_path / "cut")
    with pytest.raises(ConfigError, match="--resume"):
        fit_factors(model, tok, ds, tmp_path / "cut", **kw)
    resumed = fit_factors(model, tok, ds, tmp_path / "cut", resume=True, **kw)
    assert resumed.fingerprint == full.fingerprint
    a, b = _arrays(full), _arrays(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert fit_factors(model, tok, ds, tmp_path / "cut", **kw).fingerprint == full.fingerprint  # rerun: reused


def test_two_ranks_sum_to_the_factors_of_one(tmp_path, tok):
    model = make_model("gpt2")
    ds = _data(10, seed=3)
    kw = dict(batch_size=2, chunk_size=3, **KW)
    one = fit_factors(model, tok, ds, tmp_path / "one", **kw)
    assert fit_factors(model, tok, ds, tmp_path / "two", rank=1, world=2, **kw) is None   # rank 0 not done yet
    two = fit_factors(model, tok, ds, tmp_path / "two", rank=0, world=2, **kw)
    for name in one.unit_names:
        u1, u2 = one.unit(name), two.unit(name)
        assert (u1.tokens, u1.samples) == (u2.tokens, u2.samples)
        np.testing.assert_allclose(u2.S, u1.S, rtol=1e-6, atol=1e-12 * np.abs(u1.S).max(), err_msg=name)
        a1 = u1.A if u1.A is not None else u1.a_diag
        a2 = u2.A if u2.A is not None else u2.a_diag
        np.testing.assert_allclose(a2, a1, rtol=1e-6, atol=1e-12 * np.abs(a1).max(), err_msg=name)


def test_bad_factor_requests_are_refused_before_work(tmp_path, tok):
    model = make_model("bert")
    ds = _data(6, seed=4)
    fit_factors(model, tok, ds, tmp_path / "f", batch_size=3, chunk_size=3, **KW)
    with pytest.raises(ConfigError, match="another request.*dataset"):
        fit_factors(model, tok, _data(6, seed=5), tmp_path / "f", batch_size=3, chunk_size=3, resume=True, **KW)
    with pytest.raises(ConfigError, match="another request.*model"):
        fit_factors(make_model("bert", seed=1), tok, ds, tmp_path / "f", batch_size=3, chunk_size=3, **KW)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(ConfigError, match="factor set"):
            fit_factors(model, tok, ds, foreign, **kw, **KW)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    with pytest.raises(ConfigError, match="batch_size"):
        fit_factors(model, tok, ds, tmp_path / "g", batch_size=0, **KW)
    with pytest.raises(ConfigError, match="max_samples"):
        fit_factors(model, tok, ds, tmp_path / "g", max_samples=0, **KW)
    assert not (tmp_path / "g").exists()
    with pytest.raises(ConfigError, match="no factor set"):
        Factors.open(tmp_path / "nothing")


def test_max_samples_fits_a_seeded_subset(tmp_path, tok):
    model = make_model("bert")
    ds = _data(12, seed=6)
    f = fit_factors(model, tok, ds, tmp_path / "f", max_samples=5, sample_seed=1, batch_size=4, **KW)
    assert f.manifest["samples"] == 5 and f.identity["rows"]["n"] == 5
    rows = np.sort(np.random.default_rng(1).choice(12, 5, replace=False))
    g = fit_factors(model, tok, ds.subset(rows), tmp_path / "g", batch_size=4, **KW)
    name = f.unit_names[3]
    np.testing.assert_allclose(f.unit(name).S, g.unit(name).S, rtol=1e-5, atol=1e-9)


def test_cli_factors_then_extract_with_the_eigenbasis(tmp_path, capsys):
    import csv

    from fastinf.cli import main
    from fastinf.store import GradientStore
    from tests._hf_dirs import save_tiny

    model_dir = save_tiny(tmp_path / "model", "cls3")
    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, t in enumerate(random_texts(8, 7)):
            w.writerow([t, i % 3])
    common = ["--model", str(model_dir), "--data", str(data), "--max-length", "12", "--no-progress"]
    assert main(["factors", *common, "--out", str(tmp_path / "f"), "--layers", "attn.v", "--batch-size", "4"]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert main(["extract", *common, "--out", str(tmp_path / "s"), "--layers", "attn.v",
                 "--proj", f"pca4x4@{tmp_path / 'f'}", "--dtype", "fp32"]) == 0
    s = GradientStore.open(tmp_path / "s")
    assert s.manifest["identity"]["projection"]["factors"] == Factors.open(tmp_path / "f").fingerprint
    capsys.readouterr()
    assert main(["factors", *common, "--out", str(tmp_path / "g"), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--batch-size" in err and not (tmp_path / "g").exists()
