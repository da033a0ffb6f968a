"""Capture invariances: a sample's features do not depend on its batch-mates, on the batch order, on
how much padding follows it, and are bit-identical across repeated runs and freshly built projectors."""
from __future__ import annotations

import pytest
import torch

from _models import make_batch, make_model, sub_batch, one_thread  # noqa: F401
from fastinf.extraction.capture import features_for_batch
from fastinf.extraction.projection import ProjectionSpec, make_projectors
from fastinf.extraction.units import discover

# one encoder, one decoder (seq-cls and causal LM), one LoRA model
FAMILIES = [("bert", "seq-cls"), ("gpt2", "seq-cls"), ("llama", "causal-lm"), ("bert-lora", "seq-cls")]
LENGTHS = [6, 2, 9, 4, 9, 1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, units, proj, batch, task):
    return features_for_batch(model, units, proj, batch, task)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    err = float((a - b).abs().max() / scale)
    assert err <= 1e-5, f"{what}: max abs difference {err:.2e} of the largest entry"


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    fam, task = request.param
    model = make_model(fam, task)
    units = discover(model)
    batch = make_batch(LENGTHS, seed=11, task=task)
    proj = make_projectors(units, ProjectionSpec.parse("8x8"))
    return model, units, proj, batch, task, _run(model, units, proj, batch, task)


def test_batch_composition_and_order_invariance(setup):
    model, units, proj, batch, task, full = setup
    for rows in ([2], [5, 0], [4, 1, 3], [3, 2, 1, 0]):
        part = _run(model, units, proj, sub_batch(batch, rows), task)
        for u in units:
            _close(part.features[u.name], full.features[u.name][rows], f"{u.name} rows {rows}")
        _close(part.loss, full.loss[rows], f"loss rows {rows}")


def test_padding_invariance(setup):
    model, units, proj, batch, task, full = setup
    rows = [1, 3, 5]  # lengths 2, 4, 1: cut to the longest, then padded well beyond it
    for T in (4, 7, 16):
        part = _run(model, units, proj, sub_batch(batch, rows, T=T), task)
        for u in units:
            _close(part.features[u.name], full.features[u.name][rows], f"{u.name} padded to {T}")


def test_deterministic_across_runs(setup):
    model, units, _, batch, task, full = setup
    again = _run(model, units, make_projectors(units, ProjectionSpec.parse("8x8")), batch, task)
    for u in units:
        assert torch.equal(again.features[u.name], full.features[u.name]), f"{u.name} changed between runs"


def test_projection_seed_changes_features(setup):
    model, units, _, batch, task, full = setup
    other = _run(model, units[-1:], make_projectors(units[-1:], ProjectionSpec.parse("8x8", seed=1)), batch, task)
    assert not torch.allclose(other.features[units[-1].name], full.features[units[-1].name])


def test_padding_tokens_inside_embedding_ignored():
    """Padding positions hold arbitrary ids in some pipelines; they must still contribute nothing."""
    model = make_model("bert", "seq-cls")
    units = discover(model)
    proj = make_projectors(units, ProjectionSpec.parse("8x8"))
    batch = make_batch([3, 5], seed=2)
    junk = dict(batch)
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 17
    junk["input_ids"] = ids
    a = _run(model, units, proj, batch, "seq-cls")
    b = _run(model, units, proj, junk, "seq-cls")
    for u in units:
        _close(b.features[u.name], a.features[u.name], f"{u.name} with junk ids at pads")
