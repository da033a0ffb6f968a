"""The activation probe: measure how many bytes autograd saves per sample when capturing a model's units.

:func:`probe_activation_bytes` runs the real capture path (``fastinf.capture.features_for_batch``) on two
tiny random batches of ``max_length`` tokens under ``torch.autograd.graph.saved_tensors_hooks`` and counts
the distinct storages autograd saves (parameters and buffers excluded); the slope between the two batch
sizes is the activation memory per sample. :mod:`fastinf.extraction.plan` calls it when a model is given,
so that the plan is calibrated rather than guessed; ``model_max_positions`` caps the probed length.

The probe costs two captures (~0.1-0.2 s on MiniLM), which every ``extract`` call without a batch size used
to pay again. Results are cached per model object (weakly) and per request (units, projection, length,
task, batch sizes), keyed also on the model's *structure*: every state tensor's name, shape, dtype and
device and the module's training flag. Saved activation bytes depend on these, not on the weights' values,
so fine-tuning a model keeps its cached probe; any change of shape, dtype or device probes again.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

__all__ = ["model_max_positions", "probe_activation_bytes", "forget_probe"]

_PROBES: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()


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
    Cached per model object and request (see the module docstring).
    """
    key = _probe_key(model, units, spec, max_length, task, sizes)
    if key is None:  # a custom loss: its memory is its own, measured every time
        return _probe_uncached(model, units, spec, max_length, task, sizes)
    cached = _PROBES.get(model, {}).get(key)
    if cached is None:
        cached = _probe_uncached(model, units, spec, max_length, task, sizes)
        _PROBES.setdefault(model, {})[key] = cached
    return cached


def forget_probe(model: Any) -> None:
    """Drop the cached probe results of ``model``."""
    _PROBES.pop(model, None)


def _probe_key(model: Any, units: Sequence[Any], spec: Any, max_length: int, task: Any,
               sizes: tuple[int, int]) -> tuple | None:
    """The request and the model structure a probe result depends on (not the weights' values); None for a
    task other than the built-in ``seq-cls`` / ``causal-lm`` (a custom loss is not cached)."""
    import torch

    from fastinf.extraction.models import CausalLM, SequenceClassification

    if isinstance(task, str):
        task_name = task
    elif type(task) in (SequenceClassification, CausalLM):
        task_name = type(task).__name__
    else:
        return None

    structure = tuple((name, tuple(t.shape), str(t.dtype), str(t.device))
                      for name, t in model.state_dict(keep_vars=True).items() if torch.is_tensor(t))
    return (tuple(u.name for u in units), repr(spec), int(max_length), task_name, tuple(sizes),
            bool(getattr(model, "training", False)), structure)


def _probe_uncached(model: Any, units: Sequence[Any], spec: Any, max_length: int, task: Any,
                    sizes: tuple[int, int]) -> int:
    """The measurement itself (two captures under ``saved_tensors_hooks``)."""
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
