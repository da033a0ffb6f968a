"""Helpers shared by the retrieval tests: small synthetic stores and a tie-tolerant top-k comparison."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastinf.store import GradientStore


def make_stores(tmp: Path, n: int = 300, m: int = 6, dims: dict[str, int] | None = None, seed: int = 0,
                dtype: str = "float16") -> tuple[GradientStore, GradientStore]:
    """A train store (n rows) and a compatible test store (m rows) of gaussian features."""
    dims = dims or {"u0": 16, "u1": 8}
    rng = np.random.default_rng(seed)
    train = {u: rng.standard_normal((n, k)).astype(np.float32) for u, k in dims.items()}
    test = {u: rng.standard_normal((m, k)).astype(np.float32) for u, k in dims.items()}
    meta_tr = {"ids": np.arange(n, dtype=np.int64) + 1000}
    meta_te = {"ids": np.arange(m, dtype=np.int64) + 50}
    return (GradientStore.from_arrays(tmp / "train", train, meta=meta_tr, dtype=dtype),
            GradientStore.from_arrays(tmp / "test", test, meta=meta_te, dtype=dtype))


def stored(store: GradientStore, unit: str) -> np.ndarray:
    """The features of ``unit`` exactly as stored, in float64."""
    from fastinf.store import from_storage

    return from_storage(np.asarray(store.features(unit)), store.dtype).astype(np.float64)


def assert_topk_matches(rows: np.ndarray, scores: np.ndarray, ref: np.ndarray, k: int, *, largest: bool = True,
                        rtol: float = 1e-5, what: str = "") -> None:
    """``rows``/``scores`` (best first) must be a top-k of the reference score row ``ref`` [N].

    Ties aside: the returned scores must equal the reference at the returned rows, and the sorted
    returned scores must equal the reference's k best scores (so a swap is only allowed between rows
    whose reference scores agree within ``rtol``).
    """
    scale = rtol * max(1.0, float(np.abs(ref).max()))
    assert len(rows) == k, f"{what}: {len(rows)} rows returned, expected {k}"
    assert len(set(rows.tolist())) == k, f"{what}: duplicate rows {rows}"
    np.testing.assert_allclose(scores, ref[rows], rtol=0, atol=scale,
                               err_msg=f"{what}: returned scores differ from the reference at the returned rows")
    best = np.sort(ref)[::-1][:k] if largest else np.sort(ref)[:k]
    np.testing.assert_allclose(scores, best, rtol=0, atol=scale,
                               err_msg=f"{what}: the returned rows are not the reference top-{k}")
    order = np.argsort(-ref if largest else ref, kind="stable")[:k]
    mismatched = rows != order
    if mismatched.any():  # only near-ties may be swapped
        assert np.all(np.abs(ref[rows[mismatched]] - ref[order[mismatched]]) <= scale), \
            f"{what}: rows {rows[mismatched]} vs reference {order[mismatched]}"
