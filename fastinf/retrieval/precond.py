"""Query-side preconditioners of retrieval: which methods use one, and how an index pins the one it used.

``if`` / ``datainf`` / ``lissa`` / ``ekfac`` map a query ``q`` to ``q H⁻¹`` (``fastinf.curvature.fit_preconditioner``).
An index records a fingerprint of each unit's preconditioner at build time (``_precond_fingerprints``) and
refuses to search with a different one (``_fit_checked``); the recorded kwargs are stored as strings and
read back with ``_parse_kwarg``. Every fingerprint is computed through ``_precond_fingerprint`` here, so
building and searching agree on it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import StoreMismatchError
from fastinf.retrieval.index_store import GroupSpec

_PRECONDITIONED = ("if", "datainf", "lissa", "ekfac")   # kfac: folded into the features (a plain inner product)


def _precond_fingerprint(pre: Any) -> str:
    """Hash of what a preconditioner does: its class/parameters and its action on a fixed probe."""
    import hashlib

    probe = np.random.default_rng(1234).standard_normal((4, pre.k))
    out = np.asarray(pre.apply(probe), dtype=np.float64)
    meta = json.dumps(pre._meta(), sort_keys=True, default=str) if hasattr(pre, "_meta") else type(pre).__name__
    return hashlib.sha256(meta.encode() + np.round(out, 10).tobytes()).hexdigest()[:32]


def _precond_fingerprints(store: Any, group_specs: Sequence[GroupSpec], method: str,
                          precond_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprint of each unit's fitted preconditioner (fitted now, or read from ``<store>/precond``)."""
    if method not in _PRECONDITIONED:
        return {}
    from fastinf.scoring.curvature import fit_preconditioner

    return {unit: _precond_fingerprint(fit_preconditioner(store, unit, method, **precond_kwargs))
            for unit in dict.fromkeys(u for g in group_specs for u in g.units)}


def _fit_checked(store: Any, unit: str, method: str, kwargs: Mapping[str, Any], want: str | None,
                 directory: Path) -> Any:
    """Fit ``unit``'s preconditioner and refuse it unless its fingerprint is ``want`` (when recorded)."""
    from fastinf.scoring.curvature import fit_preconditioner

    pre = fit_preconditioner(store, unit, method, **kwargs)
    if want is not None and _precond_fingerprint(pre) != want:
        raise StoreMismatchError(
            f"index {directory}: the {method} preconditioner of unit {unit!r} differs "
            f"from the one the index was built with (cached state under {store.path}/precond changed); "
            "rebuild the index with --overwrite")
    return pre


def _parse_kwarg(v: str) -> Any:
    """Undo the str() of recorded preconditioner kwargs (ints, floats, None, or strings like 'rel:0.1')."""
    if v == "None":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v
