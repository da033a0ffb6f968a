"""Feature sources: one unit's train features ``G`` [N, k] streamed in row blocks, non-finite rows refused
or dropped.

Preconditioners are fitted and applied from a :class:`FeatureSource` (in memory: :class:`ArraySource`;
a GradientStore unit: :class:`StoreSource`), so the solvers never need all of N × k at once. Also the
shared helpers every solver uses: ``nonfinite_error`` (the NaN/inf message naming sample ids),
``store_fingerprint`` and ``to_tensor``.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Union

import numpy as np
import torch

from fastinf.errors import ConfigError, NonFiniteError, StoreError

__all__ = ["FeatureSource", "ArraySource", "StoreSource", "nonfinite_error", "store_fingerprint", "as_source",
           "to_tensor", "ArrayLike", "DEFAULT_BLOCK_ROWS"]

DEFAULT_BLOCK_ROWS = 16384  # rows of G per streamed block when fitting

ArrayLike = Union[np.ndarray, torch.Tensor]


class FeatureSource(ABC):
    """Streams one unit's train features ``G`` [N, k] in row blocks (float32; float64 arrays stay float64)."""

    n: int
    k: int
    drop_nonfinite: bool = False
    name: str = "features"

    @abstractmethod
    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` with ``block`` a float32 array [b, k]."""

    @abstractmethod
    def ids(self, rows: np.ndarray) -> np.ndarray:
        """Sample ids of the given row indices (for error messages)."""

    def blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[np.ndarray]:
        """Yield float32 blocks [b, k]; rows with NaN/inf raise, or are skipped if ``drop_nonfinite``."""
        for start, block in self._raw_blocks(block_rows):
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                if not self.drop_nonfinite:   # name every offending sample, not just this block's
                    raise nonfinite_error(self.name, self.ids(np.flatnonzero(~self.finite_rows(block_rows))))
                block = block[finite]
            if len(block):
                yield block

    def finite_rows(self, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
        """Boolean mask [N] of rows whose features are all finite."""
        mask = np.ones(self.n, dtype=bool)
        for start, block in self._raw_blocks(block_rows):
            mask[start:start + len(block)] = np.isfinite(block).all(axis=1)
        return mask

    def fingerprint(self) -> str | None:
        """A digest identifying these exact features (None: not cacheable)."""
        return None


def nonfinite_error(what: str, ids: np.ndarray) -> NonFiniteError:
    shown = ", ".join(str(int(i)) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
    return NonFiniteError(f"{len(ids)} sample(s) have NaN/inf features in {what}: ids {shown}. Expected "
                          f"finite gradients; re-extract them, or pass drop_nonfinite=True "
                          f"(CLI --drop-nonfinite) to leave these samples out")


class ArraySource(FeatureSource):
    """Features held in memory (tests, retrieval on small sets)."""

    def __init__(self, features: ArrayLike, *, ids: np.ndarray | None = None, drop_nonfinite: bool = False,
                 name: str = "features") -> None:
        g = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if g.ndim != 2:
            raise ConfigError(f"train features must be a 2-d array [N, k]; got shape {g.shape}")
        self._g = g
        self.n, self.k = g.shape
        self._ids = np.arange(self.n) if ids is None else np.asarray(ids)
        self.drop_nonfinite = drop_nonfinite
        self.name = name

    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        dtype = np.float64 if self._g.dtype == np.float64 else np.float32   # keep float64 references exact
        for s in range(0, self.n, block_rows):
            yield s, np.asarray(self._g[s:s + block_rows], dtype=dtype)

    def ids(self, rows: np.ndarray) -> np.ndarray:
        return self._ids[rows]

    def fingerprint(self) -> str | None:
        return None


class StoreSource(FeatureSource):
    """One unit of a GradientStore, read in blocks (never all of N × k at once)."""

    def __init__(self, store: Any, unit_name: str, *, drop_nonfinite: bool = False) -> None:
        if unit_name not in store.unit_names:
            raise StoreError(f"unit {unit_name!r} is not in the store at {_store_path(store)}; it has "
                             f"{len(store.unit_names)} units: {', '.join(store.unit_names[:8])}"
                             f"{' ...' if len(store.unit_names) > 8 else ''}")
        self.store = store
        self.unit_name = unit_name
        feats = store.features(unit_name)
        self.n, self.k = int(feats.shape[0]), int(feats.shape[1])
        self.drop_nonfinite = drop_nonfinite
        self.name = f"unit {unit_name!r} of {_store_path(store)}"

    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, block in self.store.iter_blocks(self.unit_name, block_rows):
            yield start, np.asarray(block, dtype=np.float32)

    def ids(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.store.meta.ids)[rows]

    def fingerprint(self) -> str | None:
        return store_fingerprint(self.store, self.unit_name)


def _store_path(store: Any) -> str:
    for attr in ("path", "root", "dir"):
        p = getattr(store, attr, None)
        if p is not None:
            return str(p)
    return "<store>"


def store_fingerprint(store: Any, unit_name: str | None = None) -> str:
    """A digest of one unit's features: the store's fingerprint (identity, sample count, checksums)."""
    fp = getattr(store, "fingerprint", None)
    if fp is None:
        raise StoreError(f"{_store_path(store)} has no fingerprint; open it with GradientStore.open")
    return hashlib.sha256(f"{fp}:{unit_name}".encode()).hexdigest()[:16]


def as_source(features: Any, unit_name: str | None = None, *, drop_nonfinite: bool = False) -> FeatureSource:
    if isinstance(features, FeatureSource):
        return features
    if isinstance(features, (np.ndarray, torch.Tensor)):
        return ArraySource(features, drop_nonfinite=drop_nonfinite)
    if hasattr(features, "iter_blocks") and hasattr(features, "features"):
        if unit_name is None:
            raise ConfigError("fit_preconditioner(store, unit_name, ...) needs the unit name for a store")
        return StoreSource(features, unit_name, drop_nonfinite=drop_nonfinite)
    raise ConfigError(f"expected a GradientStore, a FeatureSource or an array [N, k]; got {type(features).__name__}")


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory when it is writable (store memory maps are not: copy those)."""
    return torch.from_numpy(a if a.flags.writeable else np.array(a))
