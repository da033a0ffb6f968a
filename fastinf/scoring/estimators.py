"""Influence estimators: per-unit train × test scores from two GradientStores, blocked and on disk.

Sign convention: **positive = the train sample helps** (a gradient step on it lowers the test loss).
Classical influence functions report the change of the test loss when up-weighting a train sample,
``dL_test/dε = −∇ℓ_testᵀ H⁻¹ ∇ℓ_train``; fastinf reports its negative, ``∇ℓ_testᵀ H⁻¹ ∇ℓ_train``.

Per unit, with train features ``G`` [N, k] and test features ``Q`` [M, k] (rows = per-sample loss
gradients, projected or exact):

==============  ==================================================================  ==================
method          score                                                               cost
==============  ==================================================================  ==================
``graddot``     ``Q Gᵀ`` (single-checkpoint TracIn)                                 one GEMM
``gradcos``     rows L2-normalised first (norms in float64)                         one GEMM
``tracin``      ``Σ_c η_c Q_c G_cᵀ`` over checkpoints ``(test_c, train_c, η_c)``     one GEMM per ckpt
``if``          ``Q H⁻¹ Gᵀ``, ``H = GᵀG/N + λI`` (exact, or rank r + damping)         fit + one GEMM
``datainf``     ``Q H̃⁻¹ Gᵀ``, DataInf's closed form, linear in N (never N × N)       fit + one GEMM
``lissa``       ``Q H⁻¹ Gᵀ`` with H⁻¹ by the LiSSA recursion (reference solver)       iterative
``selfinf``     one row: ``−g_iᵀ H⁻¹ g_i`` (negated: high self-influence = suspicious)  fit + one pass
``loss``        one row: ``−loss_i`` (baseline; high train loss = suspicious)         free
``repsim``      cosine of stored hidden representations, one pseudo-unit per block    one GEMM
``tracin_we``   Yeh et al.: ``Σ_{v ∈ tokens(test) ∩ tokens(train)} ⟨∇E_v(test), ∇E_v(train)⟩``  sparse
==============  ==================================================================  ==================

The preconditioner (``fastinf.curvature``) is applied once to each block of test rows, so every method
except ``tracin_we`` is one ``torch.matmul`` per (unit, test block, train block), in float32 on all
threads (``precision="float64"`` for references). Blocks are sized from a memory budget
(``block_bytes``), and scores stream into a :class:`~fastinf.scores.ScoreSet` on disk, so memory is
bounded by the block size, not by M × N.

Each fast path has a literal reference beside it (``*_reference``): ``datainf_reference`` (in
``fastinf.curvature``), ``tracin_we_reference``; tests compare them on random inputs.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring.damping import Damping
from fastinf.scoring.pairwise import _score_pairwise, _score_repsim, _score_selfinf, score_arrays
from fastinf.scoring.planning import DEFAULT_BLOCK_BYTES, _dtype, _n_steps, _Plan, _Term, _test_block_rows
from fastinf.scoring.score_files import check_own
from fastinf.scoring.scores import ScoreSet, ScoreSetWriter
from fastinf.scoring.setups import _SETUPS, _check_rows_match, _Setup, _setup_pairwise
from fastinf.scoring.tracin_we import (
    TokenRows,
    _score_tracin_we,
    token_rows,
    tracin_we_arrays,
    tracin_we_reference,
)

__all__ = ["score", "score_arrays", "METHODS", "TokenRows", "token_rows", "tracin_we_arrays",
           "tracin_we_reference"]

log = logging.getLogger(__name__)

METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa", "selfinf", "loss", "repsim", "tracin_we", "kfac", "ekfac")
METHODS = METHODS + ("outlier",)          # Outlier Gradient Analysis (fastinf.scoring.outlier)


def score(test_store: Any, train_store: Any, method: str = "graddot", layers: Any = None, *,
          out: str | Path | None = None, overwrite: bool = False, damping: Damping | float | str | None = None,
          rank: int | None = None, curvature: str | None = None,
          checkpoints: Sequence[tuple[Any, Any, float]] | str | Path | None = None, topk_tokens: int | None = None,
          topk_side: str = "test", drop_nonfinite: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
          precision: str = "float32", progress: bool = False, curvature_options: dict | None = None,
          resume: bool = False, exist_ok: bool = False) -> ScoreSet:
    """Score every (test, train) pair per unit; return a :class:`~fastinf.scores.ScoreSet` on disk.

    Positive = the train sample helps (lowers the test loss); see the module docstring for each method.

    Args:
        test_store, train_store: ``GradientStore`` objects or paths, extracted with the same model,
            projection and units (checked). ``selfinf`` and ``loss`` need only the train store
            (``test_store`` may be None); ``tracin`` with ``checkpoints`` takes neither (pass None).
        method: one of ``METHODS``.
        layers: unit selector (``"middle"``, ``"first,last"``, ``"blocks[2:4]"``, ...) applied to the
            test store's units; None = all of them. Each must exist in the train store.
        out: output directory (None: a temporary directory removed with the returned object).
        overwrite: replace the score set in ``out`` — only a score set fastinf wrote, never anything else.
        resume: continue an interrupted run of the same request in ``out`` (finished parts are kept), or
            return a finished one. exist_ok: return a finished score set of the same request in ``out``
            instead of refusing (what the CLI does on a rerun). A different request in ``out`` is refused
            naming the first difference.
        damping: λ for if / lissa / datainf / selfinf: absolute (``1e-3``) or ``"rel:0.1"``
            (0.1 × mean eigenvalue of GᵀG/N). Defaults: rel:0.1 (DataInf: its closed form, the same).
        rank: ``if`` only: top-r eigenpairs + damping (Woodbury) instead of the exact inverse.
        curvature: ``selfinf`` only: ``if`` (default), ``datainf``, ``lissa`` or ``identity``.
        checkpoints: ``tracin``: ``[(test_store_c, train_store_c, lr_c), ...]``; scores ``Σ_c lr_c Q_c G_cᵀ``.
            Or the directory a ``fastinf.StoreCallback`` / ``CheckpointCapture`` wrote (its stores and lrs).
            Without it, ``tracin`` is graddot on the given pair (one checkpoint, lr 1).
        topk_tokens, topk_side: ``tracin_we`` top-k variant: keep the ``topk_tokens`` tokens with the
            largest embedding-gradient row norm on the ``test`` (default), ``train`` or ``both`` side(s).
        drop_nonfinite: leave out samples with NaN/inf features (default: raise NonFiniteError with ids).
        block_bytes: memory budget per block (sets the test and train block sizes).
        precision: ``float32`` (default; fp32 GEMM) or ``float64`` (references).
        progress: show a progress bar. ``curvature_options``: extra ``fit_preconditioner`` arguments
            (``oversample``, ``n_iter``, ``seed``, ``lissa_depth``, ...).
    """
    _check_arguments(method, damping=damping, rank=rank, curvature=curvature, topk_tokens=topk_tokens,
                     topk_side=topk_side, checkpoints=checkpoints, block_bytes=block_bytes)
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: resume continues an interrupted run in "
                          "place, overwrite discards it and starts over; pass one of them")
    if out is not None and overwrite:
        check_own(Path(out), what="overwrite=True (--overwrite)")   # before any work
    dt = _dtype(precision)
    curv = _curvature_kwargs(curvature_options, damping, rank)
    terms = _make_terms(method, _open(test_store), _open(train_store), checkpoints)
    train = terms[-1].train
    setup = _SETUPS.get(method, _setup_pairwise)(method, terms, layers, drop_nonfinite)
    plan = _make_plan(method, setup, terms, block_bytes, dt, drop_nonfinite)
    log.info("score %s: %d unit(s), %d test x %d train rows kept, test blocks of %d rows, precision %s",
             method, len(setup.units), int(plan.keep_test.sum()), int(plan.keep_train.sum()), plan.test_rows,
             precision)
    params = {"method": method, "layers": layers if layers is None or isinstance(layers, str) else list(layers),
              "damping": None if damping is None else Damping.parse(damping).describe(), "rank": rank,
              "curvature": curvature, "topk_tokens": topk_tokens, "topk_side": topk_side,
              "drop_nonfinite": drop_nonfinite, "precision": precision, "block_bytes": block_bytes,
              **_dropped_ids(plan)}
    tmp = out is None
    root = Path(tempfile.mkdtemp(prefix="fastinf-scores-")) if tmp else Path(out)
    writer = _open_writer(root, plan, params, overwrite or tmp, resume=resume, exist_ok=exist_ok)
    if writer.existing:
        log.info("score set %s already holds this request; nothing to compute", root)
        return writer.finalize()
    try:
        with _progress(_n_steps(plan, train, block_bytes), progress, f"score {method}") as bar:
            _run_method(plan, setup, writer, curv, bar, curvature=curvature, topk_tokens=topk_tokens,
                        topk_side=topk_side, block_bytes=block_bytes)
        result = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    if tmp:
        weakref.finalize(result, shutil.rmtree, str(root), True)
    return result


def _curvature_kwargs(curvature_options: dict | None, damping: Any, rank: int | None) -> dict:
    """The ``fit_preconditioner`` arguments: ``curvature_options`` plus ``damping`` and ``rank`` if given."""
    curv = dict(curvature_options or {})
    if damping is not None:
        curv["damping"] = Damping.parse(damping)
    if rank is not None:
        curv["rank"] = rank
    return curv


def _make_plan(method: str, setup: _Setup, terms: list[_Term], block_bytes: int, dt: Any, drop: bool) -> _Plan:
    """The plan of the run; refuse a run with no test or no train row left."""
    keep_test, keep_train = setup.keep_test, setup.keep_train
    if not keep_train.any() or not keep_test.any():
        raise StoreError("no test or no train sample is left after dropping samples with NaN/inf values")
    train = terms[-1].train
    k_max = max((train.feature_dim(u.name) for u in setup.units if u.name in train.unit_names), default=1)
    return _Plan(method, setup.units, terms, keep_test, keep_train,
                 _test_block_rows(k_max, len(keep_test), block_bytes), dt, drop=drop)


def _one_row(method: str) -> bool:
    """Whether ``method`` scores one row (no test samples): selfinf and loss."""
    return method in ("selfinf", "loss", "outlier")


def _dropped_ids(plan: _Plan) -> dict:
    """Provenance: the ids of the test and train samples left out (NaN/inf)."""
    test, train = plan.terms[-1].test, plan.terms[-1].train
    return {"dropped_test_ids": [] if _one_row(plan.method) else np.asarray(test.meta.ids)[~plan.keep_test].tolist(),
            "dropped_train_ids": np.asarray(train.meta.ids)[~plan.keep_train].tolist()}


def _open_writer(root: Path, plan: _Plan, params: dict, overwrite: bool, *, resume: bool = False,
                 exist_ok: bool = False) -> ScoreSetWriter:
    """Allocate the score set at ``root``: one row for selfinf / loss, else the kept test rows."""
    test, train = plan.terms[-1].test, plan.terms[-1].train
    one_row = _one_row(plan.method)
    return ScoreSetWriter(
        root, method=plan.method, units=plan.units, train_ids=np.asarray(train.meta.ids)[plan.keep_train],
        test_ids=np.array([-1]) if one_row else np.asarray(test.meta.ids)[plan.keep_test],
        test_correct=None if one_row else np.asarray(test.meta.correct, bool)[plan.keep_test],
        params=params, sources=_sources(plan.terms), overwrite=overwrite, resume=resume, exist_ok=exist_ok)


def _run_method(plan: _Plan, setup: _Setup, writer: ScoreSetWriter, curv: dict, bar: Any, *,
                curvature: str | None, topk_tokens: int | None, topk_side: str, block_bytes: int) -> None:
    """Compute and write every block of the method's scores."""
    method, keep_train = plan.method, plan.keep_train
    test, train = plan.terms[-1].test, plan.terms[-1].train
    if method == "loss":
        writer.write(0, 0, 0, (-setup.loss[keep_train]).astype(np.float32)[None, :])
        bar.update(1)
        writer.mark_done(0, 0)
    elif method == "selfinf":
        _score_selfinf(plan, writer, curvature or "if", curv, block_bytes, bar)
    elif method == "repsim":
        _score_repsim(plan, writer, test.extra("reps"), train.extra("reps"), block_bytes, bar)
    elif method == "tracin_we":
        _score_tracin_we(plan, writer, test, train, topk_tokens, topk_side, block_bytes, bar)
    elif method == "outlier":
        from fastinf.scoring.outlier import score_outlier

        score_outlier(plan, writer, curv, bar)
    else:
        _score_pairwise(plan, writer, curv, block_bytes, bar)


def _open(store: Any) -> Any:
    """A GradientStore from a store object, a path, or None."""
    if isinstance(store, (str, Path)):
        from fastinf.store import GradientStore

        return GradientStore.open(store)
    return store


def _check_arguments(method: str, *, damping: Any, rank: int | None, curvature: str | None,
                     topk_tokens: int | None, topk_side: str, checkpoints: Any, block_bytes: int) -> None:
    """Refuse option combinations that do not apply to ``method`` (before any work or output)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if damping is not None:
        Damping.parse(damping)
        if method not in ("if", "datainf", "lissa", "selfinf", "ekfac"):
            raise ConfigError(f"damping= applies to if, datainf, lissa, selfinf and ekfac; {method!r} uses no curvature solve (kfac: its damping is part of the projection)")
    if topk_side not in ("test", "train", "both"):
        raise ConfigError(f"topk_side must be 'test', 'train' or 'both'; got {topk_side!r}")
    if topk_tokens is not None and method != "tracin_we":
        raise ConfigError("topk_tokens applies to method='tracin_we' only")
    if curvature is not None and method != "selfinf":
        raise ConfigError(f"curvature= applies to method='selfinf' only; {method!r} fixes its own solver")
    if rank is not None and method != "if" and not (method == "selfinf" and (curvature or "if") == "if"):
        raise ConfigError(f"rank= applies to the 'if' solver only; got method={method!r}")
    if checkpoints and method != "tracin":
        raise ConfigError(f"checkpoints= applies to method='tracin' only; got method={method!r}")
    if block_bytes < (1 << 16):
        raise ConfigError(f"block_bytes must be at least 64 KiB; got {block_bytes}")


def _make_terms(method: str, test: Any, train: Any, checkpoints: Any) -> list[_Term]:
    """The (test, train, weight) triples: one, or one per tracin checkpoint (a list, or a capture directory)."""
    if method == "tracin" and isinstance(checkpoints, (str, Path)):   # StoreCallback / CheckpointCapture out
        from fastinf.extraction.capture_dir import capture_checkpoints

        checkpoints = capture_checkpoints(checkpoints)
    if method == "tracin" and checkpoints:
        if test is not None or train is not None:
            raise ConfigError("tracin with checkpoints=[...] takes its stores from the checkpoints; pass "
                              "test_store=None and train_store=None")
        terms = [_Term(_open(t), _open(g), float(lr)) for t, g, lr in checkpoints]
        for t in terms:
            if not math.isfinite(t.weight):
                raise ConfigError(f"checkpoint learning rates must be finite numbers; got {t.weight}")
            _check_rows_match(terms[0].test, t.test, "test")
            _check_rows_match(terms[0].train, t.train, "train")
        return terms
    if train is None:
        raise ConfigError("score() needs a train store")
    if test is None and method not in ("selfinf", "loss"):
        raise ConfigError(f"method {method!r} needs a test store (only selfinf and loss do without)")
    return [_Term(test, train, 1.0)]


def _sources(terms: list[_Term]) -> dict:
    """Provenance: the stores (paths and fingerprints) and weights the scores come from."""
    return {"checkpoints": [{"test": None if t.test is None else str(t.test.path), "train": str(t.train.path),
                             "weight": t.weight, "train_fingerprint": t.train.fingerprint,
                             "test_fingerprint": None if t.test is None else t.test.fingerprint}
                            for t in terms]}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="block", dynamic_ncols=True)
