"""Setting up a score-while-extracting run: every check, the test side and the request, before any work.

:func:`prepare_job` validates the options, opens the test store (and the preconditioner store), resolves
the extraction exactly as ``extract`` does (:func:`fastinf.extraction.extract._prepare`, with the test
store's projection, seed, task and max_length), checks that the model and units are the test store's,
and prepares the test side ``Q H⁻¹`` per unit. Bad input is a one-line ``FastinfError`` here, before a
file is written or a batch is captured. The returned :class:`_Job` opens the outputs
(:meth:`_Job.open_scores`, :meth:`_Job.open_store`) with the request that identifies them for resume.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError, StoreMismatchError

__all__ = ["STREAM_METHODS", "CURVATURE_STREAM_METHODS", "prepare_job"]

STREAM_METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa")   # on any test store
CURVATURE_STREAM_METHODS = ("kfac", "ekfac")    # on kfac / pca (eigenbasis) test stores, with their factors
_CURVED = ("if", "datainf", "lissa", "ekfac")   # need the train curvature first (kfac: folded into the features)
_SCORE_BUFFER_BYTES = 256 << 20   # the score columns of one chunk (all units), by default


@dataclasses.dataclass
class _Job:
    """A checked score-while-extracting request: the extraction run, the test side and the sizes."""

    method: str
    run: Any                       # fastinf.extraction.extract._Run
    test: Any                      # the test GradientStore
    units: list                    # the scored units (test store order)
    queries: list[torch.Tensor]    # per unit: Q H⁻¹ [M, k] in ``torch_dtype``
    torch_dtype: torch.dtype
    dtype: str                     # the train feature (store) dtype
    chunk_size: int
    identity: dict                 # the train store identity (as ``extract`` writes it)
    params: dict                   # what identifies the score set (resume / reuse checks)
    sources: dict
    keep_store: Path | None

    @property
    def n_test(self) -> int:
        return int(self.queries[0].shape[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.run.n // self.chunk_size)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        a = chunk * self.chunk_size
        return a, min(self.run.n, a + self.chunk_size)

    def open_scores(self, root: Path, *, overwrite: bool, resume: bool) -> Any:
        """The score-set writer at ``root`` (new, resumed, or an existing finished set of this request)."""
        from fastinf.scoring.scores import ScoreSetWriter

        meta = self.test.meta
        return ScoreSetWriter(root, method=self.method, units=self.units, test_ids=np.asarray(meta.ids),
                              train_ids=np.asarray(self.run.ds.ids), test_correct=np.asarray(meta.correct, bool),
                              params=self.params, sources=self.sources, overwrite=overwrite, resume=resume,
                              exist_ok=True)

    def open_store(self, *, overwrite: bool, resume: bool) -> Any:
        """The StoreWriter of the kept train store (None without ``keep_store``)."""
        from fastinf.store import StoreWriter

        if self.keep_store is None:
            return None
        r = self.run
        return StoreWriter(self.keep_store, identity=self.identity, units=r.units, feature_dims=r.dims, n=r.n,
                           dtype=r.dtype, chunk_size=self.chunk_size, n_classes=r.n_classes, extras=r.extras,
                           resume=resume, overwrite=overwrite)


def prepare_job(model: Any, tokenizer: Any, train_data: Any, test: Any, method: str, layers: Any, *,
                out: Any, keep_store: Any, preconditioner_from: Any, damping: Any, rank: Any,
                curvature_options: Any, task: Any, dtype: str, batch_size: Any, max_length: Any,
                chunk_size: Any, device: Any, precision: str, resume: bool, overwrite: bool,
                model_name: str | None = None, factors: Any = None) -> _Job:
    """Check everything and lay out the run (see the module docstring); nothing is written."""
    from fastinf.extraction.extract import _check_sizes, _identity, _prepare
    from fastinf.extraction.projection_spec import store_spec
    from fastinf.extraction.units import select
    from fastinf.scoring.curvature import check_method_projection
    from fastinf.scoring.estimators import _check_arguments, _curvature_kwargs, _open
    from fastinf.scoring.planning import _dtype
    from fastinf.store.claim import preflight_store

    _check_options(method, out, keep_store, preconditioner_from, resume, overwrite)
    _check_arguments(method, damping=damping, rank=rank, curvature=None, topk_tokens=None, topk_side="test",
                     checkpoints=None, block_bytes=1 << 20)
    torch_dtype = _dtype(precision)
    test = _open(test)
    check_method_projection(method, test, None if preconditioner_from is None else _open(preconditioner_from))
    spec = store_spec(test, factors)   # pca / kfac stores: their factor directory, fingerprint checked
    names = [u.name for u in (select(test.units, layers) if layers is not None else test.units)]
    max_length = int(max_length if max_length is not None else test.identity.get("max_length", 128))
    _check_sizes(max_length, batch_size, chunk_size)
    if keep_store is not None:
        preflight_store(keep_store, resume=resume, overwrite=overwrite)
    _check_fingerprint(test, model)   # before the batch-size probe and any capture
    batch_size = batch_size or _previous_batch(out)
    run = _prepare(model, tokenizer, train_data, keep_store, layers=names, proj=spec,
                   task=task if task is not None else test.identity.get("task", "seq-cls"), dtype=dtype,
                   batch_size=batch_size, max_length=max_length, seed=spec.seed, token_grads=False,
                   device=device)
    identity = _identity(run, model, model_name)
    _check_same_model(test, run, names)
    pre = _preconditioners(method, test, names, preconditioner_from, _curvature_kwargs(curvature_options,
                                                                                         damping, rank))
    queries = _queries(method, test, names, pre, torch_dtype)
    chunk = int(chunk_size or _default_chunk(run.batch_size, len(test.meta.ids), len(names)))
    params = _params(method, names, damping, rank, precision, run, identity, chunk, preconditioner_from)
    sources = {"test": str(test.path), "test_fingerprint": test.fingerprint,
               "keep_store": None if keep_store is None else str(keep_store)}
    return _Job(method=method, run=run, test=test, units=run.units, queries=queries, torch_dtype=torch_dtype,
                dtype=run.dtype, chunk_size=chunk, identity=identity, params=params, sources=sources,
                keep_store=None if keep_store is None else Path(keep_store))


def _check_options(method: str, out: Any, keep_store: Any, preconditioner_from: Any, resume: bool,
                   overwrite: bool) -> None:
    """Refuse what this path cannot do, naming what to use instead."""
    if method not in STREAM_METHODS + CURVATURE_STREAM_METHODS:
        raise ConfigError(f"method {method!r} cannot score while extracting (supported: "
                          f"{', '.join(STREAM_METHODS + CURVATURE_STREAM_METHODS)}); extract a train store and use "
                          "fastinf.score")
    if method in _CURVED and preconditioner_from is None:
        raise ConfigError(f"method {method!r} needs the train curvature before the first score: pass "
                          "preconditioner_from=<a train GradientStore of this model> (CLI --precondition-from), "
                          "or extract a train store and use fastinf.score")
    if method not in _CURVED and preconditioner_from is not None:
        raise ConfigError(f"preconditioner_from applies to if, datainf, lissa and ekfac; {method!r} uses no "
                          "curvature solve (kfac: it is folded into the kfac-projected features)")
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other; pass one of them")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out {out} is a file; give a directory for the score set")
    if out is not None and keep_store is not None and Path(out).resolve() == Path(keep_store).resolve():
        raise ConfigError("keep_store and out must be different directories (a store and a score set)")


def _check_fingerprint(test: Any, model: Any) -> None:
    """The train side must come from the test store's model (cached fingerprint: cheap)."""
    from fastinf.extraction.fingerprint import model_fingerprint

    mine, theirs = model_fingerprint(model)["fingerprint"], test.identity.get("model", {}).get("fingerprint")
    if theirs != mine:
        raise StoreMismatchError(f"the model is not the one the test store {test.path} was extracted with "
                                 f"(fingerprint {mine} vs {theirs}); pass that model (and checkpoint)")


def _check_same_model(test: Any, run: Any, names: list[str]) -> None:
    """The train units and feature dims must be the test store's (and its model: checked first)."""
    got = [u.name for u in run.units]
    if got != names:
        raise StoreMismatchError(f"the model's units {got[:4]} differ from the test store's {names[:4]}")
    dims = {u["name"]: u["feature_dim"] for u in test.manifest["units"]}
    bad = [n for n in names if dims[n] != run.dims[n]]
    if bad:
        raise StoreMismatchError(f"unit {bad[0]!r}: feature dim {run.dims[bad[0]]} here vs {dims[bad[0]]} in "
                                 f"the test store {test.path}")


def _preconditioners(method: str, test: Any, names: list[str], source: Any, curv: dict) -> list[Any]:
    """Per unit, the fitted preconditioner of ``source`` (a train store), or the identity."""
    from fastinf.scoring.curvature import fit_preconditioner
    from fastinf.scoring.estimators import _open
    from fastinf.scoring.pairwise import _CURVATURE
    from fastinf.scoring.preconditioners import IdentityPreconditioner

    if method not in _CURVED:
        return [IdentityPreconditioner(test.feature_dim(n), 1) for n in names]
    store = _open(source)
    test.check_compatible(store, units=names)
    return [fit_preconditioner(store, n, _CURVATURE[method], **curv) for n in names]


def _queries(method: str, test: Any, names: list[str], pre: list[Any], dt: torch.dtype) -> list[torch.Tensor]:
    """Per unit, the whole test side ``Q H⁻¹`` (gradcos: unit rows); NaN/inf test rows are refused."""
    from fastinf.scoring.pairwise import _prepare_queries
    from fastinf.scoring.setups import _raise_nonfinite
    from fastinf.scoring.sources import to_tensor

    out = []
    for name, p in zip(names, pre):
        _, q = next(test.iter_blocks(name, test.n))
        if not np.isfinite(q).all():
            _raise_nonfinite(test, names, "test")
        out.append(_prepare_queries(method, to_tensor(q).to(dt), p).to(dt).contiguous())
    return out


def _default_chunk(batch: int, m: int, n_units: int) -> int:
    """``extract``'s chunk (16 batches, at most 4096 rows), shrunk so the chunk's score columns fit
    ``_SCORE_BUFFER_BYTES``; at least one batch."""
    rows = max(batch, min(4096, batch * 16))
    return int(max(batch, min(rows, _SCORE_BUFFER_BYTES // max(1, 4 * m * n_units))))


def _params(method: str, names: list[str], damping: Any, rank: Any, precision: str, run: Any, identity: dict,
            chunk: int, preconditioner_from: Any) -> dict:
    """What identifies the score set: the scoring request and everything the train features depend on."""
    from fastinf.scoring.damping import Damping
    from fastinf.scoring.estimators import _open

    pre = None
    if preconditioner_from is not None:
        p = _open(preconditioner_from)
        pre = {"path": str(p.path), "fingerprint": p.fingerprint}
    return {"method": method, "layers": names, "damping": None if damping is None else Damping.parse(damping).describe(),
            "rank": rank, "precision": precision, "preconditioner_from": pre,
            "streamed": {"train": identity, "dtype": run.dtype, "chunk_size": int(chunk)}}


def _previous_batch(out: Any) -> int | None:
    """The batch size an interrupted run recorded in the score set at ``out`` (same features on resume)."""
    from fastinf.errors import StoreError
    from fastinf.scoring.score_files import read_manifest

    if out is None or not (Path(out) / "manifest.json").is_file():
        return None
    try:
        return int(read_manifest(Path(out))["params"]["streamed"]["train"]["batch_size"])
    except (StoreError, KeyError, TypeError, ValueError):
        return None
