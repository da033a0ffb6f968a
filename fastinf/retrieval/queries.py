"""Query inputs of a search: ``_Queries`` (features per unit, decoded on demand, and ids) and their checks.

``_as_queries`` accepts a test GradientStore (or its path) or ``{unit: [M, k] array}`` and validates it
against the index: the units and dims it needs, finite values, one M for all units, and for stores the
train store's model and projection (``GradientStore.check_compatible``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError
from fastinf.retrieval.features import _refuse_nonfinite, verify_chunks


@dataclass
class _Queries:
    """Query features per unit (float64 blocks on demand) and their ids."""

    features: Mapping[str, Any]  # unit -> [M, k] array or memmap
    ids: np.ndarray
    dtype: str | None  # store dtype to decode with (None: plain float arrays)
    store: Any = None  # the query GradientStore (blocks are read through its verified path), or None

    @property
    def m(self) -> int:
        return len(self.ids)

    def block(self, unit: str, a: int, b: int) -> np.ndarray:
        if self.store is not None:   # the store's verified read path: chunks are checksummed on first read
            verify_chunks(self.store, unit, a, b)
        x = self.features[unit][a:b]
        if self.dtype is not None:
            from fastinf.store import from_storage

            x = from_storage(x, self.dtype)
        return np.asarray(x, dtype=np.float64)


def _as_queries(queries: Any, units: Sequence[str], unit_dims: Mapping[str, int], train_store: Any) -> _Queries:
    """Validate queries against the index: same units and dims (and model/projection for stores)."""
    from fastinf.store import GradientStore

    if isinstance(queries, Mapping):
        return _array_queries(queries, units, unit_dims)
    qs = queries if isinstance(queries, GradientStore) else GradientStore.open(queries)
    if qs.n == 0:
        raise ConfigError(f"query store {qs.path} has no rows")
    _refuse_nonfinite(qs, "query")
    train_store.check_compatible(qs, units=list(units))
    return _Queries({u: qs.features(u) for u in units}, np.asarray(qs.meta.ids, dtype=np.int64), qs.dtype, qs)


def _array_queries(queries: Mapping[str, Any], units: Sequence[str], unit_dims: Mapping[str, int]) -> _Queries:
    """``{unit: [M, k]}`` query arrays, checked unit by unit."""
    feats = {}
    m = None
    for u in units:
        if u not in queries:
            raise ConfigError(f"queries lack unit {u!r}; the index needs {list(units)[:6]}")
        x = np.asarray(queries[u])
        want = unit_dims[u]
        if x.ndim != 2 or x.shape[1] != want:
            raise ConfigError(f"query features of unit {u!r} have shape {x.shape}; expected [M, {want}] "
                              "(dimension mismatch: extract queries with the train store's projection)")
        if not np.isfinite(x).all():
            from fastinf.errors import NonFiniteError

            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))[:10].tolist()
            raise NonFiniteError(f"query features of unit {u!r} hold NaN/inf at rows {rows}; fix the queries")
        if m is not None and x.shape[0] != m:
            raise ConfigError(f"query arrays disagree on M: {m} vs {x.shape[0]} rows for unit {u!r}")
        m = x.shape[0]
        feats[u] = x
    if not m:
        raise ConfigError("no queries: the query arrays have 0 rows")
    return _Queries(feats, np.arange(m, dtype=np.int64), None)
