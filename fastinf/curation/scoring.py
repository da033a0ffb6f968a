"""Per-sample influence for curation, and per-test explanations of a few train samples.

:func:`influence_scores` is one fused streaming pass (:func:`fastinf.influence`: per unit and reference
block one GEMM into an m x N slab, ranked once, added to the group's accumulator; the U x M x N score
tensor is never held or written) over the train and reference stores, aggregated over the chosen unit
group by ``how``; with ``out`` the pass commits a resumable state beside it. Lowest = most detrimental.

:func:`per_test_scores` answers "which reference samples does this train sample hurt or help most" for a
handful of train rows (the ones a report shows): for train row i and reference sample t it is the mean over
the group's units of the unit score ``S_u[t, i]`` (the score :mod:`fastinf.scoring.fused_topk` ranks and
the ``mean`` row of :func:`fastinf.aggregate_per_test`), computed exactly for those columns only
(``|rows| x M`` per unit, float64): the test side ``Q H⁻¹`` once per unit, the train rows gathered from the
store; nothing of size M x N is formed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["influence_scores", "per_test_scores", "group_units", "BLOCK_BYTES", "SLAB_BYTES"]

# Memory of the fused pass: the slabs of one set of test blocks (and their rank buffers, a few times the
# slabs) stay within a few hundred MB at any N; a train block is re-read once per set, which for the one
# group curate extracts costs far less than the extraction itself.
BLOCK_BYTES = 32 << 20
SLAB_BYTES = 128 << 20


def group_units(store: Any, group: str) -> list[str]:
    """The unit names of ``store`` that the selector ``group`` picks (``"last"``, ``"q2"``, ``"attn.v"``, ...)."""
    from fastinf.extraction.units import select

    return [u.name for u in select(store.units, group)]


def influence_scores(train: Any, reference: Any, *, method: str, how: str, group: str, damping: Any = None,
                     vote_p: float = 0.2, out: str | Path | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool = False) -> np.ndarray:
    """float64 [N] aggregated influence of every train-store row on the reference store (fused pass)."""
    from fastinf.scoring.fused import influence

    res = influence(reference, train, method, how, {"curate": group}, damping=damping, vote_p=vote_p,
                    out=out, resume=resume, overwrite=overwrite, commit_s=30.0, progress=progress,
                    block_bytes=BLOCK_BYTES, slab_bytes=SLAB_BYTES)
    return np.asarray(res.scores[("curate", how)], dtype=np.float64)


def per_test_scores(train: Any, reference: Any, rows: np.ndarray, *, method: str, group: str,
                    damping: Any = None) -> np.ndarray:
    """float64 [len(rows), M]: mean over the group's units of the score of train row ``rows[j]`` on every
    reference sample (positive = helps); see the module docstring."""
    import torch

    from fastinf.scoring.curvature import fit_preconditioner
    from fastinf.scoring.estimators import _curvature_kwargs
    from fastinf.scoring.pairwise import _CURVATURE, _prepare_keys, _prepare_queries
    from fastinf.scoring.preconditioners import IdentityPreconditioner

    names = group_units(reference, group)
    rows = np.asarray(rows, dtype=np.int64)
    total = np.zeros((len(rows), reference.n), np.float64)
    curv = _curvature_kwargs(None, damping, None)
    for name in names:
        k = train.feature_dim(name)
        pre = (IdentityPreconditioner(k, train.n) if _CURVATURE[method] == "identity"
               else fit_preconditioner(train, name, _CURVATURE[method], **curv))
        _, q = next(reference.iter_blocks(name, reference.n))
        qh = _prepare_queries(method, torch.as_tensor(np.array(q)).to(torch.float64), pre).to(torch.float64)
        g = _prepare_keys(method, torch.as_tensor(train.gather(name, rows)).to(torch.float64))
        total += (g @ qh.T).numpy()
    return total / max(1, len(names))
