"""The per-model caches of extraction never serve a stale answer: the cached model fingerprint equals a
full re-hash after every kind of weight change (optimizer step, in-place no_grad edit, a write through
``.data``, load_state_dict, a dtype change, a replaced parameter) and is not recomputed while nothing
changed; the activation probe is measured once per model structure and request. The automatic CPU batch
is capped (memory), and repeated extract calls reuse both caches."""
from __future__ import annotations

import numpy as np
import torch

from fastinf.data.datasets import TextDataset
from fastinf.extraction import fingerprint as fpmod
from fastinf.extraction import probe as probemod
from fastinf.extraction.extract import CPU_BATCH_CAP, extract
from fastinf.extraction.projection import ProjectionSpec
from fastinf.extraction.units import discover
from tests._models import make_model
from tests._tokenizer import random_texts, tiny_tokenizer


def _count(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_cached_fingerprint_equals_a_full_rehash_after_every_weight_change(monkeypatch):
    model = make_model("bert")
    seen = {fpmod.model_fingerprint(model)["fingerprint"]}
    p = next(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        model.zero_grad()
        model(input_ids=torch.tensor([[2, 5, 6, 3]])).logits.sum().backward()
        opt.step()

    def nograd_edit():
        with torch.no_grad():
            p.add_(0.5)

    def data_edit():
        p.data.mul_(1.5)

    def load():
        model.load_state_dict({k: v + 0.25 for k, v in model.state_dict().items()})

    def replace():
        model.classifier.weight = torch.nn.Parameter(torch.randn_like(model.classifier.weight))

    for change in (step, nograd_edit, data_edit, load, replace, lambda: model.double()):
        change()
        cached = fpmod.model_fingerprint(model)
        assert cached == fpmod._fingerprint_uncached(model), change
        assert cached["fingerprint"] not in seen, f"{change} was not noticed"
        seen.add(cached["fingerprint"])
    hashes = _count(monkeypatch, fpmod, "_fingerprint_uncached")
    for _ in range(3):
        fpmod.model_fingerprint(model)
    assert hashes[0] == 0, "an unchanged model must not be hashed again"
    fpmod.forget(model)
    fpmod.model_fingerprint(model)
    assert hashes[0] == 1


def test_probe_is_measured_once_per_structure_and_request(monkeypatch):
    model = make_model("llama")
    units = discover(model)
    spec = ProjectionSpec.parse("4x4")
    calls = _count(monkeypatch, probemod, "_probe_uncached")
    a = probemod.probe_activation_bytes(model, units, spec, 16)
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(0.9)                      # new weights, same structure: the memory is the same
    assert probemod.probe_activation_bytes(model, units, spec, 16) == a and calls[0] == 1
    probemod.probe_activation_bytes(model, units, spec, 24)
    assert calls[0] == 2, "another length is another request"
    model.double()
    probemod.probe_activation_bytes(model, units, spec, 16)
    assert calls[0] == 3, "another dtype is another structure"
    probemod.forget_probe(model)
    probemod.probe_activation_bytes(model, units, spec, 16)
    assert calls[0] == 4


def test_repeated_extract_reuses_the_caches_and_caps_the_cpu_batch(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path / "v")
    model = make_model("bert")
    ds = TextDataset(texts=random_texts(70, 3), labels=np.arange(70) % 3, name="d")
    hashes = _count(monkeypatch, fpmod, "_fingerprint_uncached")
    probes = _count(monkeypatch, probemod, "_probe_uncached")
    a = extract(model, tok, ds, tmp_path / "a", proj="4x4", max_length=12, progress=False)
    b = extract(model, tok, ds, tmp_path / "b", proj="4x4", max_length=12, progress=False)
    assert hashes[0] == 1 and probes[0] == 1
    assert a.identity == b.identity and a.identity["batch_size"] <= CPU_BATCH_CAP
    for name in a.unit_names:
        assert np.array_equal(a.features(name), b.features(name))
