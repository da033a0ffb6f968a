"""Per-method setups of ``score()``: which units are scored and which test / train rows are kept.

Each ``_setup_<method>`` checks that the stores hold what the method needs (units, or the extra arrays
``reps`` / ``tokens`` / ``embed_grads``), that the two stores match, and which rows hold NaN/inf
(refused with their ids, or dropped with ``drop_nonfinite``); ``_SETUPS`` maps a method to its setup
(pairwise methods use ``_setup_pairwise``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinf.errors import StoreError, StoreMismatchError
from fastinf.scoring.planning import _Term
from fastinf.scoring.sources import nonfinite_error


@dataclass
class _Setup:
    """What a method scores: its units and the test / train rows kept."""

    units: list
    keep_test: np.ndarray
    keep_train: np.ndarray
    loss: np.ndarray | None = None


def _setup_pairwise(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    test, train = terms[-1].test, terms[-1].train
    units = _resolve_units(test, train, layers)
    for t in terms[:-1]:
        _check_units_present(t.test, t.train, [u.name for u in units])
    return _Setup(units, *_keep_masks(terms, [u.name for u in units], drop))


def _setup_selfinf(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    from fastinf.extraction.units import select

    train = terms[-1].train
    units = select(train.units, layers) if layers is not None else list(train.units)
    keep_train = _finite_rows(train, [u.name for u in units])
    if not keep_train.all() and not drop:
        raise nonfinite_error(f"the train store {train.path}", np.asarray(train.meta.ids)[~keep_train])
    return _Setup(units, np.ones(1, bool), keep_train)


def _setup_loss(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    train = terms[-1].train
    loss = np.asarray(train.meta.loss, np.float64)
    keep_train = np.isfinite(loss)
    if not keep_train.all() and not drop:
        raise nonfinite_error(f"the train losses of {train.path}", np.asarray(train.meta.ids)[~keep_train])
    unit = _pseudo_unit("loss", "head", _n_blocks_of(train), "baseline.loss", 1)
    return _Setup([unit], np.ones(1, bool), keep_train, loss)


def _setup_repsim(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    from fastinf.extraction.units import select

    test, train = terms[-1].test, terms[-1].train
    reps_q = _extra_or_raise(test, "reps", method, "reps=True (CLI --reps)")
    reps_g = _extra_or_raise(train, "reps", method, "reps=True (CLI --reps)")
    if reps_q.shape[1:] != reps_g.shape[1:]:
        raise StoreMismatchError(f"representations differ in shape: test {reps_q.shape[1:]} vs train "
                                 f"{reps_g.shape[1:]}; extract both stores with the same model")
    train.check_compatible(test, units=[])
    # reps[:, 0] is the embedding output (block -1), reps[:, b] the output of block b - 1
    units = [_pseudo_unit(f"reps.{b}", "embedding" if b == 0 else "linear", b - 1, "repsim", reps_g.shape[2])
             for b in range(reps_g.shape[1])]
    units = select(units, layers) if layers is not None else units
    keep_test, keep_train = _nonfinite_extra(test, reps_q), _nonfinite_extra(train, reps_g)
    _refuse_nonfinite(test, keep_test, train, keep_train, drop, "representations")
    return _Setup(units, keep_test, keep_train)


def _setup_tracin_we(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    test, train = terms[-1].test, terms[-1].train
    how = "token_grads=True (CLI --token-grads)"
    tok_q, tok_g = _extra_or_raise(test, "tokens", method, how), _extra_or_raise(train, "tokens", method, how)
    eg_q, eg_g = _extra_or_raise(test, "embed_grads", method, how), _extra_or_raise(train, "embed_grads", method, how)
    if eg_q.shape[2] != eg_g.shape[2]:
        raise StoreMismatchError(f"embedding gradients differ in width: test d={eg_q.shape[2]} vs train "
                                 f"d={eg_g.shape[2]}; extract both stores with the same model")
    train.check_compatible(test, units=[])
    emb = [u for u in train.units if u.kind == "embedding"]
    units = emb[:1] or [_pseudo_unit("embed_tokens", "embedding", -1, "embed", int(eg_g.shape[2]),
                                     d_in=int(max(np.max(tok_g), np.max(tok_q))) + 1)]
    keep_test, keep_train = _nonfinite_extra(test, eg_q), _nonfinite_extra(train, eg_g)
    _refuse_nonfinite(test, keep_test, train, keep_train, drop, "embedding gradients")
    return _Setup(units, keep_test, keep_train)


# kfac / ekfac score through the pairwise path once the stores carry the matching projection
_CURVATURE_PROJECTION = {"kfac": ("kfac", "kfacKxK"), "ekfac": ("pca", "pcaKxK")}


def _setup_curvature(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    """kfac needs stores extracted with the kfac projection (its inverse is folded into the features:
    scoring is a plain dot product); ekfac needs eigenbasis (pca) stores (a diagonal EK-FAC solve)."""
    kind, spell = _CURVATURE_PROJECTION[method]
    for t in terms:
        for store in (t.test, t.train):
            proj = store.manifest["identity"].get("projection", {})
            if proj.get("kind") != kind:
                raise StoreMismatchError(
                    f"method {method!r} needs stores extracted with the {kind} projection (--proj "
                    f"{spell}@FACTORS after `fastinf factors`); {store.path} has {proj.get('kind')!r}")
    return _setup_pairwise(method, terms, layers, drop)


_SETUPS = {"selfinf": _setup_selfinf, "loss": _setup_loss, "repsim": _setup_repsim, "tracin_we": _setup_tracin_we,
           "kfac": _setup_curvature, "ekfac": _setup_curvature}


def _resolve_units(test: Any, train: Any, layers: Any) -> list:
    """The units to score: selected from the test store; every one must exist in the train store."""
    from fastinf.extraction.units import select

    units = select(test.units, layers) if layers is not None else list(test.units)
    _check_units_present(test, train, [u.name for u in units])
    return units


def _check_units_present(test: Any, train: Any, names: list[str]) -> None:
    """Both stores hold every unit of ``names`` with equal dims, from the same model and projection."""
    for store, other, side in ((train, test, "train"), (test, train, "test")):
        have = set(store.unit_names)
        missing = [n for n in names if n not in have]
        if missing:
            raise StoreMismatchError(
                f"the {'test' if side == 'train' else 'train'} store {other.path} has {len(missing)} unit(s) "
                f"that the {side} store {store.path} lacks: {', '.join(missing[:6])}"
                f"{' ...' if len(missing) > 6 else ''}. Extract both with the same --layers, or restrict "
                f"scoring to the shared units with layers=...")
    train.check_compatible(test, units=names)


def _check_rows_match(a: Any, b: Any, what: str) -> None:
    if a.n != b.n or not np.array_equal(np.asarray(a.meta.ids), np.asarray(b.meta.ids)):
        raise StoreMismatchError(f"tracin checkpoints must score the same {what} samples: {a.path} has "
                                 f"{a.n} rows and {b.path} has {b.n} (or different ids); extract every "
                                 f"checkpoint from the same dataset")


def _keep_masks(terms: list[_Term], names: list[str], drop_nonfinite: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows to score. Without ``drop_nonfinite`` all rows (blocks are checked as they stream, and the
    first non-finite one raises); with it, a pre-pass finds the rows finite in every unit and store."""
    keep_test = np.ones(terms[0].test.n, bool)
    keep_train = np.ones(terms[0].train.n, bool)
    if drop_nonfinite:
        for t in terms:
            keep_test &= _finite_rows(t.test, names)
            keep_train &= _finite_rows(t.train, names)
    return keep_test, keep_train


def _finite_rows(store: Any, names: Sequence[str], block_rows: int = 65536) -> np.ndarray:
    """Bool [N]: the rows whose features are finite in every unit of ``names``."""
    keep = np.ones(store.n, dtype=bool)
    for name in names:
        for start, block in store.iter_blocks(name, block_rows):
            keep[start:start + len(block)] &= np.isfinite(block).all(axis=1)
    return keep


def _raise_nonfinite(store: Any, names: Sequence[str], side: str) -> None:
    """Called when a streamed block holds NaN/inf: scan the store and name every offending sample."""
    ok = _finite_rows(store, names)
    raise nonfinite_error(f"the {side} store {store.path}", np.asarray(store.meta.ids)[~ok])


def _refuse_nonfinite(test: Any, keep_test: np.ndarray, train: Any, keep_train: np.ndarray, drop: bool,
                      what: str) -> None:
    if drop:
        return
    for store, keep, side in ((test, keep_test, "test"), (train, keep_train, "train")):
        if not keep.all():
            raise nonfinite_error(f"the {what} of the {side} store {store.path}", np.asarray(store.meta.ids)[~keep])


def _extra_or_raise(store: Any, name: str, method: str, how: str) -> np.ndarray:
    arr = store.extra(name)
    if arr is None:
        raise StoreError(f"{method} needs the extra array {name!r}, which the store {store.path} lacks; "
                         f"re-extract it with {how}")
    return arr


def _nonfinite_extra(store: Any, arr: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    keep = np.ones(store.n, bool)
    for s in range(0, store.n, block_rows):
        blk = np.asarray(arr[s:s + block_rows], np.float32).reshape(min(block_rows, store.n - s), -1)
        keep[s:s + len(blk)] = np.isfinite(blk).all(axis=1)
    return keep


def _n_blocks_of(store: Any) -> int:
    from fastinf.extraction.units import n_blocks

    return n_blocks(store.units)


def _pseudo_unit(name: str, kind: str, block: int, role: str, d_out: int, d_in: int = 1) -> Any:
    """A Unit for scores that do not come from one weight matrix (baselines, representations)."""
    from fastinf.extraction.units import Unit

    return Unit(name=name, kind=kind, block=block, role=role, d_out=max(1, d_out), d_in=max(1, d_in), bias=False)


def _setup_outlier(method: str, terms: list[_Term], layers: Any, drop: bool) -> _Setup:
    """``outlier`` (fastinf.scoring.outlier): the units of both stores, finite rows, and a test sample of every
    train class (one one-class SVM per class is fitted on the test gradients) - all checked before work."""
    test, train = terms[-1].test, terms[-1].train
    units = _resolve_units(test, train, layers)
    names = [u.name for u in units]
    keep_test, keep_train = _finite_rows(test, names), _finite_rows(train, names)
    _refuse_nonfinite(test, keep_test, train, keep_train, drop, "features")
    yq, yg = np.asarray(test.meta.label)[keep_test], np.asarray(train.meta.label)[keep_train]
    missing = sorted(set(np.unique(yg).tolist()) - set(np.unique(yq).tolist()))
    if missing:
        raise StoreError(f"outlier: the test store {test.path} has no sample of class {missing[0]}, which train "
                         "samples carry; the estimator fits one one-class SVM per class on the test gradients - "
                         "use a test set holding every class")
    return _Setup(units, np.ones(1, bool), keep_train)


_SETUPS["outlier"] = _setup_outlier
