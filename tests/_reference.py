"""Slow, obviously-correct per-sample gradients for the capture tests.

For each sample: a float64 copy of the model, the sample alone and unpadded, ``loss.backward()``, and
the parameter ``.grad`` of every unit read back (tied weights are untied first, so that the
embedding unit holds the input-side gradient only and the LM head its own) in fastinf's exact layout (``∇W`` as d_out × d_in
row-major - Conv1D and embedding weights are transposed - then ``∇b``).
"""
from __future__ import annotations

import copy

import torch

from fastinf.extraction.models import make_task
from fastinf.extraction.units import Unit, get_module


def exact_layout(unit: Unit, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """A parameter gradient in the exact-feature layout of ``unit``."""
    w = weight_grad
    if unit.transposed or unit.kind == "embedding":
        w = w.T  # Conv1D stores (d_in, d_out); the embedding unit is E^T (hidden x vocabulary)
    assert tuple(w.shape) == unit.shape, (unit.name, tuple(w.shape), unit.shape)
    parts = [w.reshape(-1)]
    if unit.bias:
        parts.append(bias_grad.reshape(-1))
    return torch.cat(parts)


def per_sample_exact(model: torch.nn.Module, units: list[Unit], batch: dict[str, torch.Tensor],
                     task: str = "seq-cls") -> dict[str, torch.Tensor]:
    """unit name -> [B, exact_dim] float64, one unpadded single-sample backward per row."""
    task_obj = make_task(task)
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    mods = {u.name: get_module(ref, u) for u in units}
    seen: set[int] = set()
    for u in units:  # untie shared weights (tied LM head): each unit gets its own parameter's gradient
        m = mods[u.name]
        if id(m.weight) in seen:
            m.weight = torch.nn.Parameter(m.weight.detach().clone())
        seen.add(id(m.weight))
    out = {u.name: [] for u in units}
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        one = {k: (v[b:b + 1, :n] if v.dim() == 2 else v[b:b + 1]) for k, v in batch.items()}
        ref.zero_grad(set_to_none=True)
        loss, _ = task_obj.per_sample_loss(ref, one)
        loss.sum().backward()
        for u in units:
            m = mods[u.name]
            wg = m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
            bias = getattr(m, "bias", None)
            bg = None
            if u.bias:
                bg = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            out[u.name].append(exact_layout(u, wg, bg))
    return {k: torch.stack(v) for k, v in out.items()}
