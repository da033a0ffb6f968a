"""Hidden representations for the RepSim baseline: per sample, the masked mean of every block's output.

``extract(..., reps=True)`` (CLI ``--reps``) stores the extra array ``reps`` [N, B + 1, d] in float32:
``reps[:, 0]`` is the embedding output and ``reps[:, b]`` the output of transformer block ``b - 1``, each
averaged over the sample's real (non-padding) tokens. ``fastinf score --method repsim`` scores the cosine
of these rows, one pseudo-unit per index, so RepSim gets the same layer groups (first / middle / last / all)
and aggregations as the gradient methods.

Why a second forward pass without gradients: the hidden states of a no-grad forward are the same numbers
as those of the gradient pass (eval mode, same inputs), and keeping them out of the capture hooks keeps the
gradient path untouched; the extra forward costs about a third of a gradient pass and only when asked for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError

__all__ = ["reps_shape", "batch_reps", "masked_mean_reps"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def reps_shape(model: torch.nn.Module) -> tuple[int, int]:
    """``(B + 1, d)``: number of hidden-state outputs (embedding + blocks) and their width, from the config."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not layers or not width:
        raise ConfigError(f"reps=True needs a transformers model whose config gives num_hidden_layers and "
                          f"hidden_size; {type(model).__name__} has neither")
    return int(layers) + 1, int(width)


def masked_mean_reps(hidden: tuple[torch.Tensor, ...] | list[torch.Tensor], mask: torch.Tensor | None
                     ) -> np.ndarray:
    """``[b, len(hidden), d]`` float32: each hidden state ``[b, T, d]`` averaged over the tokens ``mask`` marks."""
    h = torch.stack([x.detach().double() for x in hidden], dim=1)                         # [b, B+1, T, d]
    if mask is None:
        return h.mean(dim=2).float().cpu().numpy()
    w = mask.to(h.device, torch.float64)[:, None, :, None]                                # [b, 1, T, 1]
    return ((h * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)).float().cpu().numpy()


@torch.no_grad()
def batch_reps(model: torch.nn.Module, batch: dict[str, Any], expected: tuple[int, int]) -> np.ndarray:
    """Masked-mean hidden representations of one tokenized batch (a no-grad forward with hidden states)."""
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise ConfigError(f"{type(model).__name__} returned no hidden_states; reps=True needs a model that "
                          "supports output_hidden_states=True")
    reps = masked_mean_reps(hidden, inputs.get("attention_mask"))
    if reps.shape[1:] != expected:
        raise ConfigError(f"the model returned hidden states of shape {reps.shape[1:]}, its config says "
                          f"{expected}; reps=True cannot store them")
    return reps
