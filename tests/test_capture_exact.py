"""Capture correctness: features from one batched forward/backward equal per-sample gradients computed
the slow way (a float64 single-sample ``backward()`` per row, see ``_reference.py``), for every unit
kind (linear with/without bias, GPT-2 Conv1D, embedding, lora_A, lora_B, heads) of every tiny family."""
from __future__ import annotations

import pytest
import torch

from _models import CASES, make_batch, make_model, one_thread  # noqa: F401
from _reference import per_sample_exact
from fastinf.extraction.capture import features_for_batch
from fastinf.errors import ConfigError, DataError
from fastinf.extraction.models import CausalLM, CustomLoss, SequenceClassification
from fastinf.extraction.projection import ProjectionSpec, make_projectors, projection_matrices
from fastinf.extraction.units import discover, select

LENGTHS = [7, 3, 5, 1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def cases():
    """(family, task) -> (model, units, batch, exact reference), built once per module."""
    out = {}
    for fam, task in CASES:
        model = make_model(fam, task)
        units = discover(model)
        batch = make_batch(LENGTHS, seed=3, task=task)
        out[(fam, task)] = (model, units, batch, per_sample_exact(model, units, batch, task))
    return out


@pytest.mark.parametrize("fam,task", CASES)
def test_exact_mode_equals_per_sample_gradients(cases, fam, task):
    model, units, batch, ref = cases[(fam, task)]
    bf = features_for_batch(model, units, make_projectors(units, ProjectionSpec.parse("exact")), batch, task)
    kinds = {u.kind for u in units}
    assert {"embedding", "linear", "head"} <= kinds
    for u in units:
        f = bf.features[u.name]
        assert f.shape == (len(LENGTHS), u.exact_dim) and f.dtype == torch.float32
        assert ref[u.name].norm() > 0, f"reference gradient of {u.name} is zero: the test would be vacuous"
        err = _rel(f, ref[u.name])
        assert err <= 1e-5, f"{fam}/{task} unit {u.name} ({u.kind}, bias={u.bias}, transposed={u.transposed}): " \
                            f"relative error {err:.2e} vs float64 per-sample backward"


def test_every_unit_kind_is_covered():
    """The families together exercise every unit kind and layout variant the issue lists."""
    seen = set()
    for fam, task in CASES:
        for u in discover(make_model(fam, task)):
            seen.add((u.kind, u.bias, u.transposed))
    for need in [("linear", True, False), ("linear", False, False), ("linear", True, True), ("embedding", False, False),
                 ("lora_a", False, False), ("lora_b", False, False), ("head", True, False), ("head", False, False)]:
        assert need in seen, f"no tiny model has a unit of kind/bias/transposed {need}"


@pytest.mark.parametrize("fam,task", CASES)
def test_kron_features_equal_projected_exact_gradient(cases, fam, task):
    """φ = P_out [∇W, ∇b] P_inᵀ formed from the float64 exact gradient (bias as an extra input column)."""
    model, units, batch, ref = cases[(fam, task)]
    spec = ProjectionSpec.parse("8x4", seed=5)
    bf = features_for_batch(model, units, make_projectors(units, spec), batch, task)
    for u in units:
        P_out, P_in = (p.double() for p in projection_matrices(u, spec))
        e = ref[u.name]
        W = e[:, : u.d_out * u.d_in].reshape(-1, u.d_out, u.d_in)
        if u.bias:
            W = torch.cat([W, e[:, u.d_out * u.d_in:].unsqueeze(-1)], dim=2)       # (B, d_out, d_in + 1)
        want = (P_out @ W @ P_in.T).reshape(len(LENGTHS), -1)
        err = _rel(bf.features[u.name], want)
        assert err <= 1e-5, f"{fam}/{task} {u.name}: kron features off by {err:.2e} from P_out ∇W P_inᵀ"


def test_outputs_loss_pred_correct(cases):
    model, units, batch, _ = cases[("bert", "seq-cls")]
    sel = select(units, "last")
    bf = features_for_batch(model, sel, make_projectors(sel, ProjectionSpec()), batch, SequenceClassification())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(bf.loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bf.logits, logits)
    assert torch.equal(bf.pred, logits.argmax(-1)) and torch.equal(bf.correct, logits.argmax(-1) == batch["labels"])


def test_causal_lm_loss_is_mean_nll_over_real_targets(cases):
    model, units, batch, _ = cases[("llama", "causal-lm")]
    sel = select(units, "last")
    bf = features_for_batch(model, sel, make_projectors(sel, ProjectionSpec()), batch, CausalLM())
    assert bf.logits is None and bf.pred.tolist() == [-1] * len(LENGTHS)
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            lg = model(input_ids=batch["input_ids"][b:b + 1, :n]).logits[0]
        want = torch.nn.functional.cross_entropy(lg[:-1], batch["input_ids"][b, 1:n]) if n > 1 else torch.tensor(0.0)
        torch.testing.assert_close(bf.loss[b], want, rtol=1e-5, atol=1e-6)


def test_custom_loss_matches_builtin_task(cases):
    model, units, batch, _ = cases[("gpt2", "seq-cls")]
    sel = select(units, "attn,last")
    proj = make_projectors(sel, ProjectionSpec())

    def ce(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none"), logits

    a = features_for_batch(model, sel, proj, batch, CustomLoss(ce))
    b = features_for_batch(model, sel, proj, batch, "seq-cls")
    for u in sel:
        torch.testing.assert_close(a.features[u.name], b.features[u.name], rtol=0, atol=0)
    assert torch.equal(a.pred, b.pred)


def test_no_weight_gradients_and_flags_restored(cases):
    model, units, batch, _ = cases[("bert-lora", "seq-cls")]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())  # peft: LoRA trainable, base frozen
    model.train()
    features_for_batch(model, units, make_projectors(units, ProjectionSpec()), batch, "seq-cls")
    assert model.training, "train/eval mode must be restored"
    model.eval()
    assert all(p.grad is None for p in model.parameters()), "capture wrote a .grad"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_backprop_stops_at_lowest_selected_unit(cases):
    """Selecting only the last block must not differentiate anything below it: the embedding output
    gets no gradient (checked with a tensor hook that would fire if autograd reached it)."""
    model, units, batch, _ = cases[("bert", "seq-cls")]
    sel = select(units, "blocks[1:2]")
    fired = []
    emb = model.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, i, o: o.register_hook(fired.append) if o.requires_grad else None)
    try:
        features_for_batch(model, sel, make_projectors(sel, ProjectionSpec()), batch, "seq-cls")
    finally:
        h.remove()
    assert not fired


def test_shared_module_called_twice_sums_contributions():
    """A module applied twice in one forward contributes Σ over calls (weight sharing)."""
    torch.manual_seed(0)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.lin = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask=None):
            h = torch.tanh(self.lin(torch.tanh(self.lin(self.emb(input_ids)))))
            return self.head(h.mean(1))

    model = Twice().eval()
    from fastinf.extraction.units import Unit
    units = [Unit("lin", "linear", 0, "other", 6, 6, True), Unit("head", "head", 1, "head", 3, 6, True)]
    batch = {"input_ids": torch.randint(0, 10, (3, 4)), "attention_mask": torch.ones(3, 4, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1])}
    bf = features_for_batch(model, units, make_projectors(units, ProjectionSpec.parse("exact")), batch, "seq-cls")
    ref = per_sample_exact(model, units, batch, "seq-cls")
    for u in units:
        assert _rel(bf.features[u.name], ref[u.name]) <= 1e-5


def test_bad_inputs(cases):
    model, units, batch, _ = cases[("bert", "seq-cls")]
    proj = make_projectors(units, ProjectionSpec())
    with pytest.raises(ConfigError, match="at least one unit"):
        features_for_batch(model, [], proj, batch, "seq-cls")
    with pytest.raises(ConfigError, match="No projector"):
        features_for_batch(model, units, {}, batch, "seq-cls")
    with pytest.raises(ConfigError, match=r"\[B, T\]"):
        features_for_batch(model, units, proj, {**batch, "input_ids": batch["input_ids"][0]}, "seq-cls")
    with pytest.raises(DataError, match="Labels must lie in"):
        features_for_batch(model, units, proj, {**batch, "labels": batch["labels"] + 5}, "seq-cls")
    with pytest.raises(DataError, match="labels"):
        features_for_batch(model, units, proj, {k: v for k, v in batch.items() if k != "labels"}, "seq-cls")
    with pytest.raises(ConfigError, match="Unknown task"):
        features_for_batch(model, units, proj, batch, "regression")
    with pytest.raises(ConfigError, match=r"per-sample loss of shape \(4,\)"):
        features_for_batch(model, units, proj, batch, CustomLoss(lambda m, b: m(input_ids=b["input_ids"]).logits.sum()))
    with pytest.raises(ConfigError, match="Causal LM expects logits"):
        features_for_batch(model, units, proj, batch, "causal-lm")
