"""Invariant: extracting a store through the Triton kernels (interpreted on CPU) gives the same store as
the torch path, unit by unit, within the fp32 tolerance; and the kernels were really used.

Also runs ``bench/gpu.py --device cpu --tiny``, the dry run of the GPU benchmark's code paths.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import fastinf.kernels as K
from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
from tests._models import make_batch, make_model
from tests._tokenizer import random_texts, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls that reach the Triton launchers (so a test cannot pass on the torch path alone)."""
    from fastinf.kernels import embed, kron
    calls = {"kron": 0, "embed": 0}

    def spy(mod, name):
        real = getattr(mod, name)

        def wrapped(*a, **kw):
            calls[name.split("_")[0]] += 1
            return real(*a, **kw)
        monkeypatch.setattr(mod, name, wrapped)

    spy(kron, "kron_project")
    spy(embed, "embed_project")
    return calls


def test_bert_store_is_the_same_with_kernels(tmp_path, kernel_calls):
    tok = tiny_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(0)
    ds = TextDataset(texts=random_texts(9, 0), labels=rng.integers(0, 3, 9), name="tiny")
    stores = {}
    for backend in ("torch", "triton"):
        model = make_model("bert")
        with K.use_backend(backend):
            stores[backend] = extract(model, tok, ds, tmp_path / backend, layers="all", proj="16x16", dtype="fp32",
                                      batch_size=5, max_length=16, progress=False)
    assert kernel_calls["kron"] > 0 and kernel_calls["embed"] > 0, "the Triton path was not taken"
    a, b = stores["torch"], stores["triton"]
    assert a.unit_names == b.unit_names
    for name in a.unit_names:
        fa, fb = np.asarray(a.features(name), np.float64), np.asarray(b.features(name), np.float64)
        err = np.abs(fa - fb).max() / max(np.abs(fa).max(), 1e-30)
        assert err <= 1e-5, f"unit {name}: kernel store differs from torch store by rel. {err:.2e}"
    np.testing.assert_array_equal(a.meta.pred, b.meta.pred)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_features_are_the_same_with_kernels(family, kernel_calls):
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.projection import ProjectionSpec, make_projectors
    from fastinf.extraction.units import discover, select

    model = make_model(family)
    units = select(discover(model), "all")
    projectors = make_projectors(units, ProjectionSpec(k_out=16, k_in=8))
    batch = make_batch([5, 9, 2], seed=3)
    feats = {}
    for backend in ("torch", "triton"):
        with K.use_backend(backend):
            feats[backend] = features_for_batch(model, units, projectors, batch, "seq-cls").features
    assert kernel_calls["kron"] > 0
    for name, want in feats["torch"].items():
        got = feats["triton"][name]
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, f"{family} unit {name}: rel. error {err:.2e}"


def test_gpu_bench_dry_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)      # dataclasses resolve their module by name
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    rc = bench.main(["--device", "cpu", "--tiny", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["targets"]["all_checks_pass"], result["rows"]
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"kron", "embed", "lowrank", "extract"}, kinds
    assert all(r["fast_ms"] is not None for r in result["rows"] if r["kind"] == "extract")
