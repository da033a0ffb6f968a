"""Per-test *margins* of a model: the outcome a datamodel retrain records (LDS ground truth).

Sequence classification: ``margin = z_y - logsumexp_{c != y} z_c`` (correct logit minus the log-sum-exp
of the others; for two classes simply ``z_y - z_other``), the quantity TRAK's LDS uses: monotone in the
probability of the correct class and unbounded, so it keeps ranking subsets after the model is sure.
Causal LM: ``margin = -mean token loss`` of the sample (higher = better, the same orientation).

Either way **higher = the model does better on that test sample**, so a train sample that helps raises
it (fastinf's sign convention). One retrained subset gives one float64 [M] vector.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError

__all__ = ["classification_margins", "margins_of"]


def classification_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - logsumexp_{c != y} z_c`` per row of ``logits`` [B, C] (float64 [B])."""
    z = logits.double()
    if z.ndim != 2 or z.shape[1] < 2:
        raise ConfigError(f"margins need logits of shape (batch, classes >= 2), found {tuple(z.shape)}")
    rows = torch.arange(z.shape[0])
    others = z.clone()
    others[rows, labels] = float("-inf")
    return z[rows, labels] - torch.logsumexp(others, dim=1)


def _causal_margins(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``-mean token NLL`` per sample (next-token prediction over the non-padded positions)."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                            reduction="none")
    m = mask[:, 1:].double()
    return -(nll * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def margins_of(model: Any, tokenizer: Any, data: Any, *, max_length: int, task: str = "seq-cls",
                 batch_size: int = 64) -> np.ndarray:
    """The margin of every sample of ``data`` under ``model`` (eval mode): float64 [len(data)]."""
    from fastinf.experiment.train import _collate, _encode, _labels_of

    if task not in ("seq-cls", "causal-lm"):
        raise ConfigError(f"task: expected 'seq-cls' or 'causal-lm', found {task!r}")
    was_training = model.training
    model.eval()
    rows = _encode(tokenizer, data, max_length)
    y = _labels_of(data) if task == "seq-cls" else torch.zeros(len(rows), dtype=torch.long)
    out = []
    for s in range(0, len(rows), batch_size):
        batch = _collate(tokenizer, rows[s:s + batch_size], y[s:s + batch_size])
        labels = batch.pop("labels")
        if task == "seq-cls":
            out.append(classification_margins(model(**batch).logits, labels))
        else:
            out.append(_causal_margins(model, batch))
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float64)
