"""Capture: per-sample projected gradients of the selected units from ONE batched forward/backward.

For a unit ``y = x Wᵀ (+ b)`` the per-sample gradient is ``∇W ℓ_n = Σ_t g_{n,t} x_{n,t}ᵀ`` with
``g = ∂ℓ_n/∂y``. Since ``ℓ_n`` depends only on sample ``n``, ``∂(Σ_m ℓ_m)/∂y_n = ∂ℓ_n/∂y_n``, so the
output gradients of all samples come from one ``torch.autograd.grad(Σ ℓ, unit outputs)``.

How it is made cheap (``features_for_batch``):

1. All parameters get ``requires_grad=False`` for the duration (restored afterwards), so autograd
   builds no weight-gradient nodes: no weight-gradient GEMM runs and no ``.grad`` is written.
2. Forward hooks on the selected modules record each unit's input and make its output require grad
   when it does not already. The lowest selected units become the roots of the graph, so backprop
   stops there: nothing below them is differentiated.
3. For the Kronecker projection the input side ``P_in [x, 1]`` is projected inside the forward hook
   (one GEMM), so the full activation ``x`` is not kept; after the backward each unit needs one more
   GEMM ``P_out g`` and a batched ``(k_out×T)(T×k_in)`` product. Exact mode and the CUDA kernel path
   keep ``x`` and hand ``(x, g, mask)`` to ``UnitProjector.project``.

Padding contributes nothing: output gradients are multiplied by the attention mask (and embedding
rows of ``padding_idx`` are dropped, as ``nn.Embedding`` does), and a sample's features do not depend
on its batch-mates. A module called several times in one forward (shared weights) contributes the
sum over its calls.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

from fastinf.errors import ConfigError, NonFiniteError
from fastinf.extraction.models import Task, make_task
from fastinf.extraction.projection import UnitProjector, _kernels_for, _kron_combine, _project_in, _project_out
from fastinf.extraction.units import Unit, get_module


@dataclass
class BatchFeatures:
    """Result of one batch: per-unit features and per-sample outputs (all on the model's device).

    features: unit name -> [B, feature_dim] float32; loss [B] float32; logits [B, C] float32 for
    classification (None for causal LM); pred [B] int64 (-1 when undefined); correct [B] bool.
    raw: for the units asked for with ``raw_units``, ``(x, g)``: the unit input (token ids [B, T] for
    the embedding) and the masked gradient w.r.t. the unit output, scaled for scaled embeddings so that
    ``∇W = Σ_t g_t x_tᵀ`` (embedding: ``∇E[id_t] += g_t``).
    """

    features: dict[str, torch.Tensor]
    loss: torch.Tensor
    logits: torch.Tensor | None
    pred: torch.Tensor
    correct: torch.Tensor
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter, restoring the previous flags on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), restoring the previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _embedding_scale(module: nn.Module) -> torch.Tensor | float | None:
    """Scaled word embeddings (Gemma & co.) multiply their lookup by ``embed_scale`` inside forward, so
    ``∂ℓ/∂E_row = embed_scale · ∂ℓ/∂y``."""
    if type(module).__name__.endswith("ScaledWordEmbedding"):
        return getattr(module, "embed_scale", None)
    return None


class _Record:
    """What one call of a unit's module left behind: the output (to differentiate against) and either
    the projected input ``px`` (split Kronecker path) or the raw input ``x``."""

    __slots__ = ("y", "x", "px", "mask")

    def __init__(self, y: torch.Tensor, x: torch.Tensor | None, px: torch.Tensor | None,
                 mask: torch.Tensor | None) -> None:
        self.y, self.x, self.px, self.mask = y, x, px, mask


class _UnitCapture:
    """Forward hook of one unit: records inputs/outputs of every call of its module."""

    def __init__(self, unit: Unit, module: nn.Module, projector: UnitProjector,
                 token_mask: torch.Tensor | None, keep_raw: bool = False) -> None:
        self.unit = unit
        self.module = module
        self.proj = projector
        self.token_mask = token_mask
        self.records: list[_Record] = []
        self.keep_raw = keep_raw
        # The split path (project x in the forward hook) is the torch Kronecker path of linear units.
        self.split = projector.spec.kind != "exact" and unit.kind != "embedding" and not keep_raw
        pad = getattr(module, "padding_idx", None) if unit.kind == "embedding" else None
        self.padding_idx = pad

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if self.unit.kind == "embedding":
            m = torch.ones_like(x, dtype=torch.float32) if m is None or m.shape != x.shape else m.float()
            if self.padding_idx is not None:
                m = m * (x != self.padding_idx).float()
            return m
        if m is None or x.dim() != 3 or x.shape[:2] != m.shape:
            return None  # (B, d) inputs (pooled heads) have one position per sample
        return m.float()

    def hook(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise ConfigError(f"Unit {self.unit.name}: expected a tensor input, got {type(inputs[0]).__name__ if inputs else 'nothing'}.")
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(y, torch.Tensor):
            raise ConfigError(f"Unit {self.unit.name}: expected a tensor output, got {type(y).__name__}.")
        if not y.requires_grad:
            y.requires_grad_()  # y is a fresh leaf: the graph (and backprop) starts here
        x = inputs[0].detach()
        mask = self._mask_for(x)
        if self.split and _kernels_for(x) is None:
            with torch.no_grad():
                px = _project_in(x, self.proj.P_in, self.unit.bias)             # (k_in, B*T)
            self.records.append(_Record(y, None, px, mask))
        else:
            self.records.append(_Record(y, x, None, mask))
        return output

    def raw(self, grads: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, masked g)`` of the single call of this unit's module."""
        if len(self.records) != 1:
            raise ConfigError(f"Unit {self.unit.name} ran {len(self.records)} times in one forward; raw "
                              "(x, g) capture needs a module that runs once.")
        rec, g = self.records[0], grads[0]
        if g is None:
            g = torch.zeros(rec.y.shape, dtype=torch.float32, device=rec.y.device)
        g = self._scaled(g)
        g = g if g.dtype == torch.float64 else g.float()
        if rec.mask is not None:
            g = g * rec.mask.reshape(*rec.mask.shape, 1).to(g.dtype)
        return rec.x, g

    def _scaled(self, g: torch.Tensor) -> torch.Tensor:
        if self.unit.kind == "embedding":
            scale = _embedding_scale(self.module)
            if scale is not None:
                return g * scale
        return g

    def features(self, grads: list[torch.Tensor | None], B: int, device: torch.device) -> torch.Tensor:
        """Sum over this unit's calls of the projected per-sample gradient -> [B, dim] float32."""
        out: torch.Tensor | None = None
        for rec, g in zip(self.records, grads):
            if g is None:
                continue  # this call's output does not reach the loss: zero contribution
            g = self._scaled(g)
            if rec.px is not None:
                pg = _project_out(g, self.proj.P_out, rec.mask)                          # (k_out, B*T)
                phi = _kron_combine(pg, rec.px, g.shape[0]).reshape(g.shape[0], -1)      # (B, k_out*k_in)
            else:
                phi = self.proj.project(rec.x, g, rec.mask)
            out = phi if out is None else out + phi
        if out is None:
            out = torch.zeros(B, self.proj.dim, dtype=torch.float32, device=device)
        return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _check_finite(name: str, t: torch.Tensor, batch: dict[str, Any]) -> None:
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        ids = batch.get("ids", batch.get("id"))
        which = [int(ids[r]) for r in rows] if isinstance(ids, torch.Tensor) else rows
        raise NonFiniteError(f"Non-finite {name} for samples {which[:20]} (batch rows {rows[:20]}); check the "
                             "inputs of these samples, the model dtype (use float32) and the labels.")


def features_for_batch(model: nn.Module, units: list[Unit], projectors: dict[str, UnitProjector],
                       batch: dict[str, Any], task: Task | str = "seq-cls", *,
                       raw_units: Collection[str] | None = None, check_finite: bool = True) -> BatchFeatures:
    """Per-sample features of every unit in ``units`` for one batch.

    One forward pass of ``task.per_sample_loss`` and one ``torch.autograd.grad(loss.sum(), outputs)``;
    no weight gradients are computed and no ``.grad`` is written. The model runs in eval mode and its
    ``requires_grad`` flags and train/eval mode are restored afterwards. ``batch["attention_mask"]``
    (if present) marks real tokens. Raises ``NonFiniteError`` naming samples whose loss or features
    are NaN/inf, unless ``check_finite=False`` (extraction: the store records such samples with their
    ids and scoring refuses them unless told to drop them). ``raw_units``: names of units whose raw ``(x, g)`` are also returned in
    ``BatchFeatures.raw`` (e.g. the embedding, for TracIn-WE).
    """
    task = _checked_task(units, projectors, task)
    try:
        device = next(model.parameters()).device
    except StopIteration as e:
        raise ConfigError(f"{type(model).__name__} has no parameters.") from e
    batch = _to_device(batch, device)
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError(f"batch['input_ids'] must be a [B, T] tensor, got "
                          f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}.")
    B = ids.shape[0]
    token_mask = batch.get("attention_mask")
    raw_units = set(raw_units or ())
    unknown = raw_units - {u.name for u in units}
    if unknown:
        raise ConfigError(f"raw_units {sorted(unknown)[:5]} are not among the selected units.")
    caps = [_UnitCapture(u, get_module(model, u), projectors[u.name], token_mask, u.name in raw_units)
            for u in units]
    loss, logits, grads = _forward_backward(model, caps, batch, task, B, check_finite)
    with torch.no_grad():
        features, raw = _collect_features(caps, grads, B, device)
        pred, correct = task.predictions(logits.detach() if logits is not None else None, batch)
    if check_finite:
        for name, f in features.items():
            _check_finite(f"features of {name}", f, batch)
    out_logits = logits.detach().float() if logits is not None and logits.dim() == 2 else None
    return BatchFeatures(features=features, loss=loss.detach().float(), logits=out_logits,
                         pred=pred, correct=correct, raw=raw)


def _checked_task(units: list[Unit], projectors: dict[str, UnitProjector], task: Task | str) -> Task:
    """The Task object, once there are units and each has a projector."""
    if not units:
        raise ConfigError("features_for_batch needs at least one unit; select() returned none?")
    task = make_task(task)
    missing = [u.name for u in units if u.name not in projectors]
    if missing:
        raise ConfigError(f"No projector for units {missing[:5]}; build them with make_projectors(units, spec).")
    return task


def _forward_backward(model: nn.Module, caps: list[_UnitCapture], batch: dict[str, Any], task: Task, B: int,
                      check_finite: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """One hooked forward of the per-sample loss and one ``autograd.grad`` to every captured unit output;
    returns (loss [B], logits, output gradients in record order). The hooks are always removed."""
    handles = []
    try:
        with frozen_parameters(model), eval_mode(model), torch.enable_grad():
            for c in caps:
                handles.append(c.module.register_forward_hook(c.hook))
            loss, logits = task.per_sample_loss(model, batch)
            for h in handles:
                h.remove()
            handles.clear()
            if loss.shape != (B,):
                raise ConfigError(f"Task {task!r} returned a loss of shape {tuple(loss.shape)}, expected ({B},).")
            if check_finite:
                _check_finite("loss", loss.detach(), batch)
            for c in caps:
                if not c.records:
                    raise ConfigError(f"Unit {c.unit.name} did not run in the forward pass of {type(model).__name__}; "
                                      "deselect it (e.g. --layers 'all,-{0}').".format(c.unit.name))
            outputs = [r.y for c in caps for r in c.records]
            if not loss.requires_grad:
                raise ConfigError("The loss does not depend on any selected unit; check the selection and the task.")
            grads = torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
        return loss, logits, grads
    finally:
        for h in handles:
            h.remove()


def _collect_features(caps: list[_UnitCapture], grads: tuple, B: int, device: torch.device
                      ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each unit's features (and raw ``(x, g)`` where kept) from its share of ``grads``; clears the records."""
    features: dict[str, torch.Tensor] = {}
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    i = 0
    for c in caps:
        n = len(c.records)
        features[c.unit.name] = c.features(list(grads[i:i + n]), B, device)
        if c.keep_raw:
            raw[c.unit.name] = c.raw(list(grads[i:i + n]))
        i += n
        c.records.clear()
    return features, raw
