"""Feature rows as retrieval reads them: the train side of a group and the checks on stored features.

``GroupFeatures`` decodes a group's train rows ``[w_u · normalise?(G_u)]`` (streamed blocks for building and
exact search, gathered rows for exact re-scoring); ``_l2_normalize`` is the ``gradcos`` normalisation used
on both sides; ``_open_store`` and ``_refuse_nonfinite`` are the store checks shared by building and
searching. Kept apart from ``index`` and ``build`` so both can use them without importing each other.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from fastinf.retrieval.index_store import GroupSpec


class GroupFeatures:
    """Train-side rows of one group: ``[w_u · normalise?(G_u)]`` over its units, decoded to float.

    ``blocks`` streams checksummed store blocks (index build, exact search); ``gather`` reads arbitrary
    rows through the memory maps (exact re-scoring of candidates).
    """

    def __init__(self, store: Any, group: GroupSpec, normalize: bool) -> None:
        self.store, self.group, self.normalize = store, group, normalize

    def _finish(self, parts: list[np.ndarray], dtype: type) -> np.ndarray:
        out = []
        for w, x in zip(self.group.weights, parts):
            x = np.asarray(x, dtype=dtype)
            if self.normalize:
                x = _l2_normalize(x)
            out.append(x * dtype(w) if w != 1.0 else x)
        return np.ascontiguousarray(np.concatenate(out, axis=1) if len(out) > 1 else out[0])

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(row0, float32 [b, D])`` blocks over all train rows."""
        its = [self.store.iter_blocks(u, block_size) for u in self.group.units]
        for parts in zip(*its):
            yield parts[0][0], self._finish([p[1] for p in parts], np.float32)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float64 ``[len(rows), D]`` for sorted, unique ``rows``; their store chunks are checksummed first."""
        from fastinf.store import from_storage

        for u in self.group.units:
            verify_rows(self.store, u, rows)
        parts = [from_storage(self.store.features(u)[rows], self.store.dtype) for u in self.group.units]
        return self._finish(parts, np.float64)


def verify_rows(store: Any, unit: str, rows: np.ndarray) -> None:
    """Check the checksums of the store chunks holding ``rows`` of ``unit`` (each chunk once per store object).

    Goes through the store's verified read path (``iter_blocks``), reading one row per chunk: the store
    checksums the whole chunk on its first read and remembers it, so repeated searches cost nothing more. A
    corrupt chunk raises CorruptStoreError naming the unit and chunk.
    """
    rows = np.asarray(rows)
    c = max(1, int(store.chunk_size))
    for chunk in np.unique(rows // c) if rows.size else ():
        _touch(store, unit, int(chunk) * c)


def verify_chunks(store: Any, unit: str, a: int, b: int) -> None:
    """``verify_rows`` for the row range ``[a, b)``."""
    c = max(1, int(store.chunk_size))
    for chunk in range(a // c, (b - 1) // c + 1) if b > a else ():
        _touch(store, unit, chunk * c)


def _touch(store: Any, unit: str, row: int) -> None:
    for _ in store.iter_blocks(unit, 1, start=row, stop=row + 1):
        pass


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (norms accumulated in float64; zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms[norms == 0] = 1.0
    return (x / norms[:, None].astype(x.dtype)) if x.dtype != np.float64 else x / norms[:, None]


def _open_store(store: Any) -> Any:
    from fastinf.store import GradientStore

    return store if isinstance(store, GradientStore) else GradientStore.open(store)


def _refuse_nonfinite(store: Any, side: str) -> None:
    """NaN/inf rows would poison inner-product search (FAISS has no notion of them): refuse, naming ids."""
    bad = store.nonfinite
    if bad:
        from fastinf.errors import NonFiniteError

        ids = [d.get("id") for d in bad[:10]]
        raise NonFiniteError(f"{side} store {store.path} has {len(bad)} samples with NaN/inf features (ids {ids}"
                             f"{' ...' if len(bad) > 10 else ''}); retrieval cannot rank them. Re-extract without "
                             "those samples (or in fp32 if fp16 overflowed)")
