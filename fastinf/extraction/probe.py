"""The activation probe: measure how many bytes autograd saves per sample when capturing a model's units.

:func:`probe_activation_bytes` runs the real capture path (``fastinf.capture.features_for_batch``) on two
tiny random batches of ``max_length`` tokens under ``torch.autograd.graph.saved_tensors_hooks`` and counts
the distinct storages autograd saves (parameters and buffers excluded); the slope between the two batch
sizes is the activation memory per sample. :mod:`fastinf.extraction.plan` calls it when a model is given,
so that the plan is calibrated rather than guessed; ``model_max_positions`` caps the probed length.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["model_max_positions", "probe_activation_bytes"]


def model_max_positions(model: Any) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings`` / ``n_positions``), if known."""
    cfg = getattr(model, "config", None)
    vals = [getattr(cfg, a, None) for a in ("max_position_embeddings", "n_positions")]
    vals = [int(v) for v in vals if isinstance(v, int) and v > 0]
    return min(vals) if vals else None


def probe_activation_bytes(model: Any, units: Sequence[Any], spec: Any, max_length: int,
                           task: Any = "seq-cls", sizes: tuple[int, int] = (2, 4)) -> int:
    """Bytes autograd saves per sample when capturing ``units`` at ``max_length`` tokens (measured).

    Runs ``features_for_batch`` on two random full-length batches under ``saved_tensors_hooks`` and
    returns the per-sample slope of the distinct saved storages (parameters and buffers excluded).
    """
    import torch

    from fastinf.extraction.models import make_task
    from fastinf.extraction.projection import UnitProjector

    task = make_task(task)
    max_length = min(max_length, model_max_positions(model) or max_length)
    device = next(model.parameters()).device
    fixed = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    projectors = {u.name: UnitProjector(u, spec, device=device) for u in units}
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or max((u.d_in for u in units if u.kind == "embedding"), default=2))
    n_labels = int(getattr(cfg, "num_labels", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    measured = []
    for b in sizes:
        batch = _random_batch(b, max_length, vocab, n_labels, task, device, gen)
        measured.append(_saved_bytes(model, units, projectors, batch, task, fixed))
    slope = (measured[1] - measured[0]) / (sizes[1] - sizes[0])
    return max(0, int(math.ceil(slope)))


def _random_batch(b: int, max_length: int, vocab: int, n_labels: int, task: Any, device: Any,
                  gen: Any) -> dict[str, Any]:
    """A full-length batch of ``b`` random token rows (and labels for the task), drawn from ``gen``."""
    import torch

    ids = torch.randint(1, max(2, vocab), (b, max_length), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if task.name == "causal-lm":
        batch["labels"] = batch["input_ids"]
    else:
        batch["labels"] = torch.randint(0, n_labels, (b,), generator=gen).to(device)
    return batch


def _saved_bytes(model: Any, units: Sequence[Any], projectors: dict[str, Any], batch: dict[str, Any],
                 task: Any, fixed: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for one capture of ``batch`` (``fixed`` ones excluded)."""
    import torch

    from fastinf.extraction.capture import features_for_batch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in fixed and ptr not in seen:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features_for_batch(model, list(units), projectors, batch, task)
    return sum(seen.values())
