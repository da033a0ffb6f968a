"""Score while extracting: per-unit influence of train samples computed as their gradients are extracted.

``score_while_extracting(model, tokenizer, train_data, test, method)`` gives the
:class:`~fastinf.scoring.scores.ScoreSet` that ``fastinf.score(test, extract(model, tokenizer, train_data,
...), method)`` gives, without writing the train GradientStore (or, with ``keep_store=``, writing it in the
same pass). For exact features and large projections the train store is the biggest cost of the two-stage
path (a 22 GB fp32 store for 512 MiniLM samples, written and read back); here every train batch goes from
the capture (:func:`fastinf.extraction.extract.chunk_batches`: the batching, length sorting and capture of
``extract`` itself) through one GEMM per unit against the preconditioned test side held in memory
(``Q H⁻¹``, as ``fastinf.score`` prepares it) into the score columns of its rows, and is then dropped.

Equality with store-then-score: each feature is rounded to the store dtype (``dtype``, fp16 by default)
exactly as the store would hold it, then scored in ``precision``; so the scores equal the two-stage ones up
to float32 GEMM rounding (the GEMM shapes differ: one batch of train rows instead of a store block), and to
float64 rounding with ``precision="float64"``. Tests pin both, on tiny models of each family.

Curvature (``if``, ``datainf``, ``lissa``, ``ekfac``) needs a pass over the train features before the first score, so
this function **takes a fitted preconditioner from an earlier pass**: ``preconditioner_from=`` a train
GradientStore with the same model, projection and units (e.g. a store of the same data, or of a sample of
it, extracted earlier; the fit is cached under ``<store>/precond/`` as for ``fastinf.score``). It never
makes a hidden second pass; without ``preconditioner_from`` those methods are refused before any work.

Resumable: the train rows go in chunks (as in ``extract``); a chunk's score columns are written and then
recorded in the score set's progress log, so a killed run continues with ``resume=True`` from its last
recorded chunk and gives the same scores (features are a deterministic function of the rows and the batch
size, which the request records). With ``keep_store``, the store's own chunk records are resumed too.

Memory: the preconditioned test side (M x Σk x 4 bytes), one batch of capture, and the score columns of
one chunk (U x M x chunk x 4 bytes; the default chunk keeps them under 256 MiB). Disk: the scores, and
the train store only with ``keep_store``. Fused rank / vote aggregation cannot start before the stream
ends (a ranker ranks all N train samples), so the result is the per-unit score set; aggregate it with
``fastinf.aggregate`` / ``aggregate_all``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinf.errors import NonFiniteError
from fastinf.scoring.extract_score_setup import CURVATURE_STREAM_METHODS, STREAM_METHODS, _Job, prepare_job
from fastinf.scoring.scores import ScoreSet

__all__ = ["score_while_extracting", "STREAM_METHODS", "CURVATURE_STREAM_METHODS"]


def score_while_extracting(model: torch.nn.Module, tokenizer: Any, train_data: Any, test: Any,
                           method: str = "graddot", layers: Any = None, *, out: str | Path | None = None,
                           keep_store: str | Path | None = None, preconditioner_from: Any = None,
                           damping: Any = None, rank: int | None = None, curvature_options: dict | None = None,
                           task: Any = None, dtype: str = "fp16", batch_size: int | None = None,
                           max_length: int | None = None, chunk_size: int | None = None, device: Any = None,
                           precision: str = "float32", resume: bool = False, overwrite: bool = False,
                           progress: bool = False, stats: Any = None, model_name: str | None = None,
                           factors: Any = None) -> ScoreSet:
    """Extract the train gradients of ``train_data`` batch by batch and score them against ``test``.

    Returns the ScoreSet ``fastinf.score(test, <train store of train_data>, method, layers)`` returns (see
    the module docstring for equality, curvature, resume and memory).

    Args:
        model, tokenizer: the model the test store was extracted with (its fingerprint is checked).
        train_data: the train dataset (TextDataset, a spec such as a file path or ``"sms"``, rows, ...).
        test: the test GradientStore (or its path); its projection, seed, task and max_length are used.
        method: one of :data:`STREAM_METHODS` or :data:`CURVATURE_STREAM_METHODS`. ``layers``: unit selector over the test store's units.
        out: the score-set directory (None: a temporary one removed with the returned object).
        keep_store: also write the train GradientStore there (the one ``extract`` would write).
        preconditioner_from: for if / datainf / lissa: a fitted train store to take the curvature from.
        damping, rank, curvature_options, precision: as in ``fastinf.score``.
        task, max_length: default to the test store's. dtype: the train feature dtype (fp16 | bf16 | fp32),
            the store's if kept; features are rounded to it before scoring in either case.
        batch_size, chunk_size, device: as in ``extract`` (batch: the plan's, or the interrupted run's).
        resume: continue an interrupted run of the same request in ``out`` (and ``keep_store``). A finished
            score set of the same request in ``out`` is returned as it is (nothing recomputed).
        overwrite: replace a score set (and store) fastinf wrote there.
        stats: an ``ExtractStats`` to fill (timings). model_name: the name recorded in a kept store.
        factors: the factor directory of a pca / pcamix / kfac test store (its fingerprint is checked); the
            train rows are projected with it. ``kfac`` needs a kfac test store; ``ekfac`` a pca test store and
            ``preconditioner_from`` a pca train store (its diagonal EK-FAC eigenvalues).
    """
    from fastinf.extraction.extract import ExtractStats

    job = prepare_job(model, tokenizer, train_data, test, method, layers, out=out, keep_store=keep_store,
                      preconditioner_from=preconditioner_from, damping=damping, rank=rank,
                      curvature_options=curvature_options, task=task, dtype=dtype, batch_size=batch_size,
                      max_length=max_length, chunk_size=chunk_size, device=device, precision=precision,
                      resume=resume, overwrite=overwrite, model_name=model_name, factors=factors)
    stats = stats if stats is not None else ExtractStats()
    tmp = out is None
    root = Path(tempfile.mkdtemp(prefix="fastinf-scores-")) if tmp else Path(out)
    result = _run(job, model, tokenizer, root, overwrite=overwrite, fresh=tmp, resume=resume, stats=stats,
                  progress=progress)
    if tmp:
        weakref.finalize(result, shutil.rmtree, str(root), True)
    return result


def _run(job: _Job, model: torch.nn.Module, tokenizer: Any, root: Path, *, overwrite: bool, fresh: bool,
         resume: bool, stats: Any, progress: bool) -> ScoreSet:
    """Open the outputs, stream every pending chunk, seal the store (if kept) and the score set.
    ``fresh``: ``root`` is a new temporary directory (never a reason to overwrite a kept store)."""
    scores = job.open_scores(root, overwrite=overwrite or fresh, resume=resume)
    if scores.existing:
        return scores.finalize()
    store = None
    try:
        store = job.open_store(overwrite=overwrite, resume=resume)
        pending, store_done = _pending(job, scores, store)
        bar = _bar(job, pending, progress)
        t0 = time.perf_counter()
        try:
            for chunk in pending:
                _stream_chunk(job, model, tokenizer, scores, store, chunk, chunk in store_done, stats, bar)
        finally:
            bar.close()
        if store is not None:
            store.finalize()
        stats.seconds += time.perf_counter() - t0
        return scores.finalize()
    except BaseException:
        if store is not None:
            store.abort()
        scores.abort()
        raise


def _pending(job: _Job, scores: Any, store: Any) -> tuple[list[int], set[int]]:
    """Chunks still to stream (scores or store not recorded) and the chunks the kept store already holds."""
    n_units = len(job.units)
    scored = {c for c in range(job.n_chunks) if all(scores.is_done(ui, c) for ui in range(n_units))}
    every = set(range(job.n_chunks))
    store_done = every - set(store.pending_chunks()) if store is not None else every
    return [c for c in range(job.n_chunks) if c not in scored or c not in store_done], store_done


def _bar(job: _Job, pending: list[int], progress: bool) -> Any:
    from fastinf.extraction.extract import _progress_bar

    total = sum(job.chunk_rows(c)[1] - job.chunk_rows(c)[0] for c in pending)
    return _progress_bar(total, f"score-while-extracting {job.method}", progress)


def _stream_chunk(job: _Job, model: torch.nn.Module, tokenizer: Any, scores: Any, store: Any, chunk: int,
                  stored: bool, stats: Any, bar: Any) -> None:
    """Capture the chunk's rows batch by batch, score each batch into the chunk's columns, write and record
    them (and the chunk's store rows when a store is kept and does not hold them yet)."""
    from fastinf.extraction.extract import chunk_batches, collect_chunk

    a, b = job.chunk_rows(chunk)
    cols = [np.empty((job.n_test, b - a), np.float32) for _ in job.units]
    kept: list[tuple] = []
    for rows, feats, meta, ext in chunk_batches(job.run, model, tokenizer, a, b, stats, bar):
        _score_batch(job, feats, meta["ids"], rows - a, cols)
        if store is not None and not stored:
            kept.append((rows, feats, meta, ext))
    t0 = time.perf_counter()
    if kept:
        store.write_chunk(chunk, *collect_chunk(iter(kept), a))
    for ui in range(len(job.units)):
        if not scores.is_done(ui, chunk):
            scores.write(ui, 0, a, cols[ui])
    for ui in range(len(job.units)):
        if not scores.is_done(ui, chunk):
            scores.mark_done(ui, chunk)
    stats.write_s += time.perf_counter() - t0
    stats.samples += b - a


def _score_batch(job: _Job, feats: dict[str, np.ndarray], ids: np.ndarray, cols_at: np.ndarray,
                 cols: list[np.ndarray]) -> None:
    """One GEMM per unit: the batch's features, rounded to the store dtype, against ``Q H⁻¹``."""
    from fastinf.scoring.pairwise import _prepare_keys
    from fastinf.store.format import from_storage, to_storage

    for ui, unit in enumerate(job.units):
        g = from_storage(to_storage(feats[unit.name], job.dtype), job.dtype)
        if not np.isfinite(g).all():
            bad = ids[~np.isfinite(g).all(axis=1)]
            raise NonFiniteError(f"train samples {bad[:10].tolist()} have NaN/inf gradients in unit "
                                 f"{unit.name!r}; leave them out of the train data (score-while-extracting "
                                 "has no drop_nonfinite)")
        keys = _prepare_keys(job.method, torch.from_numpy(np.ascontiguousarray(g)).to(job.torch_dtype))
        s = job.queries[ui] @ keys.T
        cols[ui][:, cols_at] = s.to(torch.float32).numpy()
