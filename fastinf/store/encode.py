"""Encoding one chunk's rows for the store: every array in its stored dtype, shapes checked.

``encode_features`` converts each unit's float32 rows to the store dtype (and lists the units holding
NaN/inf per row); ``encode_meta_and_extras`` the metadata (defaults for missing optional fields) and extra
arrays. Used by the chunked writer (chunked.py) before it writes a chunk; pure functions of their inputs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fastinf.errors import ConfigError
from fastinf.store.format import ArraySpec, to_storage

__all__ = ["encode_features", "encode_meta_and_extras"]


def encode_features(units: Sequence[Any], arrays: Mapping[str, ArraySpec], dtype: str, chunk: int,
                    features: Mapping[str, np.ndarray], rows: int
                    ) -> tuple[dict[str, np.ndarray], dict[int, list[str]]]:
    """Each unit's rows in the store dtype, and the units holding NaN/inf per row of the chunk."""
    payload: dict[str, np.ndarray] = {}
    bad_rows: dict[int, list[str]] = {}
    for u in units:
        x = np.asarray(features[u.name], dtype=np.float32)
        if x.shape != (rows, arrays[f"unit:{u.name}"].row_shape[0]):
            raise ConfigError(f"chunk {chunk}: unit {u.name!r} rows have shape {x.shape}, expected "
                              f"({rows}, {arrays[f'unit:{u.name}'].row_shape[0]})")
        finite = np.isfinite(x).all(axis=1)
        for r in np.flatnonzero(~finite):
            bad_rows.setdefault(int(r), []).append(u.name)
        payload[f"unit:{u.name}"] = to_storage(x, dtype)
    return payload, bad_rows


def encode_meta_and_extras(arrays: Mapping[str, ArraySpec], chunk: int, meta: Mapping[str, np.ndarray],
                           extras: Mapping[str, np.ndarray] | None, ids: np.ndarray, rows: int
                           ) -> dict[str, np.ndarray]:
    """The chunk's meta and extra arrays in their stored dtypes (missing meta fields get defaults)."""
    payload: dict[str, np.ndarray] = {}
    defaults = {"ids": ids, "label": np.full(rows, -1), "loss": np.full(rows, np.nan),
                "pred": np.full(rows, -1), "correct": np.zeros(rows, bool)}
    for key, spec in arrays.items():
        kind, _, name = key.partition(":")
        if kind == "meta":
            src = meta.get(name, defaults.get(name))
            if src is None:
                raise ConfigError(f"chunk {chunk}: meta field {name!r} is required by this store")
            payload[key] = np.ascontiguousarray(np.asarray(src).astype(spec.dtype).reshape(rows, *spec.row_shape))
        elif kind == "extra":
            if extras is None or name not in extras:
                raise ConfigError(f"chunk {chunk}: extra array {name!r} is required by this store")
            payload[key] = np.ascontiguousarray(np.asarray(extras[name]).astype(spec.dtype)
                                                .reshape(rows, *spec.row_shape))
    return payload
