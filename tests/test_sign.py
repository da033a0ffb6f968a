"""Semantic sign test: positive score = the train sample helps the test sample.

On a tiny float64 model, take the train sample with the largest (smallest) score for a test sample and
up-weight it by a small ε in one exact step on that unit's weights — a GD step ``−ε g`` for graddot,
the Newton-type step ``−ε H⁻¹ g`` with the very preconditioner that scored it for if / datainf. The
test loss must go down (up), by ``ε · score`` to first order (finite differences).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.scoring.curvature import fit_preconditioner
from fastinf.scoring.estimators import score
from fastinf.store import GradientStore
from fastinf.extraction.units import Unit

D_IN, HID, C = 6, 5, 3
UNITS = [Unit("l1", "linear", 0, "mlp.up", HID, D_IN, bias=True), Unit("l2", "head", 1, "head", C, HID, bias=False)]
SHAPES = {"l1": [("W1", (HID, D_IN)), ("b1", (HID,))], "l2": [("W2", (C, HID))]}


def _model():
    g = torch.Generator().manual_seed(3)
    params = {"W1": torch.randn(HID, D_IN, generator=g, dtype=torch.float64),
              "b1": torch.randn(HID, generator=g, dtype=torch.float64) * 0.1,
              "W2": torch.randn(C, HID, generator=g, dtype=torch.float64)}
    x = torch.randn(80, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (80,), generator=g)
    return params, x, y


def _loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = torch.tanh(x @ params["W1"].T + params["b1"]) @ params["W2"].T
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def _grads(params: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    out = {"l1": [], "l2": []}
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gW1, gb1, gW2 = torch.autograd.grad(_loss(p, x[i:i + 1], y[i:i + 1]).sum(), [p["W1"], p["b1"], p["W2"]])
        out["l1"].append(torch.cat([gW1.flatten(), gb1]).numpy())
        out["l2"].append(gW2.flatten().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def _step(params: dict, unit: str, direction: np.ndarray, eps: float) -> dict:
    """Parameters after ``θ_unit ← θ_unit − ε · direction`` (direction in the unit's feature layout)."""
    new, off = dict(params), 0
    for name, shape in SHAPES[unit]:
        size = int(np.prod(shape))
        new[name] = params[name] - eps * torch.from_numpy(direction[off:off + size].reshape(shape))
        off += size
    return new


@pytest.mark.parametrize("method", ["graddot", "if", "datainf"])
def test_high_score_helps_and_low_score_hurts(tmp_path, method):
    params, x, y = _model()
    xtr, ytr, xte, yte = x[:70], y[:70], x[70:], y[70:]
    train = GradientStore.from_arrays(tmp_path / "tr", _grads(params, xtr, ytr), units=UNITS, dtype="float32")
    test = GradientStore.from_arrays(tmp_path / "te", _grads(params, xte, yte), units=UNITS, dtype="float32")
    G = _grads(params, xtr, ytr)
    s = score(test, train, method, precision="float64")
    eps = 1e-7
    for unit in ("l1", "l2"):
        S = s.unit_scores(unit)
        precond = fit_preconditioner(train, unit, {"graddot": "identity"}.get(method, method))
        for m in range(len(xte)):
            base = float(_loss(params, xte[m:m + 1], yte[m:m + 1]))
            for i, expect in ((int(S[m].argmax()), -1.0), (int(S[m].argmin()), +1.0)):
                direction = precond.apply(G[unit][i][None])[0]               # H⁻¹ g_i (g_i for graddot)
                after = float(_loss(_step(params, unit, direction, eps), xte[m:m + 1], yte[m:m + 1]))
                delta = after - base
                assert np.sign(delta) == expect, (
                    f"{method}/{unit}: test {m}, train {i} with score {S[m, i]:+.4g}: the loss moved by "
                    f"{delta:+.3g}; a {'positive' if expect < 0 else 'negative'} score must "
                    f"{'lower' if expect < 0 else 'raise'} it")
                # first order: ΔL ≈ −ε · score (up to O(ε) terms and the float32 rounding of the features)
                assert delta == pytest.approx(-eps * float(S[m, i]), rel=1e-3)
