"""Per-unit curvature preconditioners in the (projected or exact) feature space of one unit.

Given the train features ``G`` [N, k] of one unit, a preconditioner maps test features ``Q`` [M, k] to
``Q H⁻¹`` so that influence scores are a single GEMM, ``S = apply(Q) @ Gᵀ`` (and FAISS-compatible).
``H`` is symmetric, so ``Q H⁻¹ = (H⁻¹ Qᵀ)ᵀ``. Implementations (pick with ``method=`` and ``rank=``):

- ``identity``  — ``H = I`` (graddot / TracIn). Free.
- ``if`` exact  — damped Gauss-Newton / empirical Fisher ``H = GᵀG/N + λI``, accumulated in float64 in
  one streamed pass and inverted by eigendecomposition. Use for k up to a few thousand (k×k memory).
- ``if`` low rank — ``rank=r < k``: top-r eigenpairs ``(U, Λ)`` of ``GᵀG/N`` from a randomized
  subspace iteration streamed over the store (never forms k×k), then Woodbury:
  ``H⁻¹ = U diag(1/(Λ+λ) − 1/λ) Uᵀ + I/λ`` (the spectrum outside the top r is treated as 0).
- ``datainf``   — Kwon et al.'s closed form ``H⁻¹v ≈ (v − (1/N) Σ_i (vᵀg_i)/(λ+‖g_i‖²) g_i)/λ`` with
  ``λ = 0.1·Σ‖g_i‖²/(N·k)``. It is linear in v, so for moderate k it is fitted once as the k×k matrix
  ``(I − Gᵀ diag(1/(λ+‖g‖²)) G / N)/λ`` (one pass over the store; never the N×N Gram); for large k
  it is applied by streaming (one pass per query batch).
- ``ekfac``     — diagonal ``H = diag(Λ) + λI`` with ``Λ_j = Σ_i g_ij²/N``: on the features of a ``pca``
  (eigenbasis) store this is EK-FAC's eigenvalue-corrected Kronecker Hessian, truncated to the stored
  eigen-directions (George et al. 2018; Grosse et al. 2023). Damping default rel:0.1 (0.1 × mean Λ).
- ``lissa``     — the LiSSA recursion ``h ← v + h − (H h)/s`` (``H`` damped, ``s`` ≥ its top eigenvalue),
  ``H⁻¹v = h/s``. A slow reference solver that converges to the exact ``if`` answer.

Damping is given absolutely (``Damping(1e-3)``, CLI ``--damping 1e-3``) or relative to the mean
eigenvalue of ``GᵀG/N`` (``Damping(0.1, relative=True)``, CLI ``--damping rel:0.1``); the mean eigenvalue
``Σ‖g‖²/(N·k)`` is exact (a trace), so relative damping costs nothing extra.

Fitted preconditioners are saved next to the train store under ``precond/`` (key: unit, method and
every parameter, plus the store fingerprint) and reused by later calls.

The pieces live in their own modules: ``damping`` (:class:`Damping`), ``sources`` (feature sources),
``preconditioners`` (the fitted classes and their files); this module fits them (``fit_preconditioner``),
caches them and holds the literal ``datainf_reference``. Every name is importable from here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring.damping import DATAINF_DAMPING, DEFAULT_IF_DAMPING, Damping
from fastinf.scoring.preconditioners import (
    DensePreconditioner,
    DiagonalPreconditioner,
    IdentityPreconditioner,
    LissaPreconditioner,
    LowRankPreconditioner,
    Preconditioner,
    StreamingDataInfPreconditioner,
    load_preconditioner,
)
from fastinf.scoring.sources import (
    DEFAULT_BLOCK_ROWS,
    ArraySource,
    FeatureSource,
    StoreSource,
    as_source,
    nonfinite_error,
    store_fingerprint,
    to_tensor,
)

__all__ = [
    "Damping", "Preconditioner", "IdentityPreconditioner", "DensePreconditioner", "LowRankPreconditioner",
    "DiagonalPreconditioner",
    "StreamingDataInfPreconditioner", "LissaPreconditioner", "FeatureSource", "ArraySource",
    "StoreSource", "fit_preconditioner", "load_preconditioner", "datainf_reference", "store_fingerprint",
    "nonfinite_error", "as_source", "to_tensor", "METHODS", "STORE_PROJECTION", "check_method_projection",
]

log = logging.getLogger(__name__)

METHODS = ("identity", "if", "datainf", "lissa", "ekfac")
# the store projection each curvature-aware scoring method needs (kfac: the inverse is folded into the
# features, so scoring is a plain dot product; ekfac: a diagonal solve in the K-FAC eigenbasis)
STORE_PROJECTION = {"kfac": "kfac", "ekfac": "pca"}
MAX_DENSE_K = 4096          # above this, k x k float64 matrices (128 MB) are not formed by default
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    n: int
    sum_sq: float                       # Σ‖g‖² (float64)
    gram: np.ndarray | None = None      # GᵀG (float64) when requested

    def mean_eigenvalue(self, k: int) -> float:
        return self.sum_sq / (self.n * k)


def _stats(source: FeatureSource, with_gram: bool, block_rows: int) -> _Stats:
    n, sum_sq = 0, 0.0
    gram = torch.zeros(source.k, source.k, dtype=torch.float64) if with_gram else None
    for g in source.blocks(block_rows):
        g = to_tensor(g).to(torch.float64)
        n += len(g)
        sum_sq += float((g * g).sum())
        if gram is not None:
            gram += g.T @ g
    if n == 0:
        raise StoreError(f"no (finite) train rows in {source.name}: cannot fit a preconditioner on 0 samples")
    return _Stats(n, sum_sq, None if gram is None else gram.numpy())


def _fit_exact(source: FeatureSource, damping: Damping, block_rows: int) -> DensePreconditioner:
    st = _stats(source, True, block_rows)
    H0 = st.gram / st.n
    evals, evecs = np.linalg.eigh((H0 + H0.T) / 2)
    evals = np.clip(evals, 0.0, None)                     # PSD up to rounding
    lam = damping.resolve(st.mean_eigenvalue(source.k))
    inverse = (evecs / (evals + lam)) @ evecs.T
    return DensePreconditioner("if", inverse, lam, st.n, eigenvalues=evals[::-1].copy())


def _fit_lowrank(source: FeatureSource, damping: Damping, rank: int, *, oversample: int, n_iter: int,
                 seed: int, block_rows: int) -> LowRankPreconditioner:
    """Randomized subspace iteration on ``GᵀG/N``, each product ``(GᵀG/N) Ω`` one streamed pass."""
    k = source.k
    width = min(k, rank + oversample)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(k, width, generator=gen, dtype=torch.float64)

    def hmul(X: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        out, n, sum_sq = torch.zeros_like(X), 0, 0.0
        for g in source.blocks(block_rows):
            g = to_tensor(g).to(torch.float64)
            out += g.T @ (g @ X)
            n += len(g)
            sum_sq += float((g * g).sum())
        if n == 0:
            raise StoreError(f"no (finite) train rows in {source.name}: cannot fit a preconditioner on 0 samples")
        return out / n, n, sum_sq

    Y, n, sum_sq = hmul(omega)
    for _ in range(n_iter):
        Y, _, _ = hmul(torch.linalg.qr(Y).Q)
    basis = torch.linalg.qr(Y).Q                           # (k, width) orthonormal
    HB, _, _ = hmul(basis)
    small = basis.T @ HB
    evals, V = torch.linalg.eigh((small + small.T) / 2)
    order = torch.argsort(evals, descending=True)[:rank]
    U = basis @ V[:, order]
    lam = damping.resolve(sum_sq / (n * k))
    return LowRankPreconditioner(U.numpy(), np.clip(evals[order].numpy(), 0.0, None), lam, n)


def _fit_ekfac(source: FeatureSource, damping: Damping, block_rows: int) -> DiagonalPreconditioner:
    """``Λ_j = Σ_i g_ij² / N`` in one float64 pass; ``λ`` resolved against the mean of ``Λ``."""
    n, sq = 0, torch.zeros(source.k, dtype=torch.float64)
    for g in source.blocks(block_rows):
        g = to_tensor(g).to(torch.float64)
        n += len(g)
        sq += (g * g).sum(0)
    if n == 0:
        raise StoreError(f"no (finite) train rows in {source.name}: cannot fit a preconditioner on 0 samples")
    lam = damping.resolve(float(sq.sum()) / (n * source.k))
    return DiagonalPreconditioner("ekfac", (sq / n).numpy(), lam, n)


def _fit_datainf(source: FeatureSource, damping: Damping, dense: bool, block_rows: int) -> Preconditioner:
    st = _stats(source, False, block_rows)
    lam = damping.resolve(st.mean_eigenvalue(source.k))
    if not dense:
        return StreamingDataInfPreconditioner(source, lam, st.n, block_rows)
    A = torch.zeros(source.k, source.k, dtype=torch.float64)
    for g in source.blocks(block_rows):
        g = to_tensor(g).to(torch.float64)
        A += (g / (lam + (g * g).sum(1, keepdim=True))).T @ g          # Gᵀ diag(1/(λ+‖g‖²)) G
    inverse = (np.eye(source.k) - A.numpy() / st.n) / lam
    return DensePreconditioner("datainf", (inverse + inverse.T) / 2, lam, st.n)


def _fit_lissa(source: FeatureSource, damping: Damping, *, scale: float | None, depth: int, tol: float,
               batch_rows: int | None, seed: int, block_rows: int) -> LissaPreconditioner:
    st = _stats(source, False, block_rows)
    lam = damping.resolve(st.mean_eigenvalue(source.k))
    if scale is None:
        # λ_max(GᵀG/N) ≤ tr(GᵀG/N) = Σ‖g‖²/N: a safe (conservative) bound that guarantees convergence.
        scale = 1.01 * (st.sum_sq / st.n + lam)
    if not scale > 0:
        raise ConfigError(f"LiSSA scale must be > 0; got {scale}")
    return LissaPreconditioner(source, lam, st.n, scale, depth=depth, tol=tol, batch_rows=batch_rows,
                               seed=seed, block_rows=block_rows)


def fit_preconditioner(store: Any, unit_name: str | None = None, method: str = "if", *,
                       damping: Damping | float | str | None = None, rank: int | None = None,
                       oversample: int = 10, n_iter: int = 2, seed: int = 0,
                       max_dense_k: int = MAX_DENSE_K, lissa_scale: float | None = None,
                       lissa_depth: int = 1000, lissa_tol: float = 1e-10, lissa_batch_rows: int | None = None,
                       drop_nonfinite: bool = False, cache: bool = True,
                       block_rows: int = DEFAULT_BLOCK_ROWS) -> Preconditioner:
    """Fit the preconditioner of one unit from its train features.

    Args:
        store: a GradientStore (with ``unit_name``), a :class:`FeatureSource`, or an array ``G`` [N, k].
        method: ``identity`` | ``if`` | ``datainf`` | ``lissa`` | ``ekfac`` (see the module docstring).
        damping: λ, absolute (``1e-3``) or relative (``"rel:0.1"`` = 0.1 × mean eigenvalue of GᵀG/N).
            Defaults: ``if``/``lissa``/``ekfac`` rel:0.1; ``datainf`` its closed form (also rel:0.1).
        rank: ``if`` only. ``None`` = exact (k ≤ ``max_dense_k``) ; ``r < k`` = top-r + damping (Woodbury).
        oversample, n_iter, seed: the randomized eigensolver (extra columns, power iterations, RNG seed).
        lissa_*: LiSSA's scale (default: a bound on the top eigenvalue), max depth, tolerance, and
            rows per stochastic step (None: the full GᵀG/N each step).
        drop_nonfinite: skip train rows with NaN/inf features instead of raising ``NonFiniteError``.
        cache: reuse / write the fitted state under ``<store>/precond/`` (stores only).

    Returns a :class:`Preconditioner` whose ``apply(Q)`` is ``Q H⁻¹``.
    """
    if method not in METHODS:
        raise ConfigError(f"curvature method must be one of {', '.join(METHODS)}; got {method!r}")
    source = as_source(store, unit_name, drop_nonfinite=drop_nonfinite)
    k = source.k
    if method == "identity":
        if damping is not None or rank is not None:
            raise ConfigError("the identity preconditioner takes no damping or rank; drop them or use method='if'")
        return IdentityPreconditioner(k, source.n)
    default = DATAINF_DAMPING if method == "datainf" else DEFAULT_IF_DAMPING
    damp = Damping.parse(damping, default)
    _check_rank(method, rank, k, max_dense_k)
    params = _cache_params(method, damp, rank, drop_nonfinite, dense=k <= max_dense_k, oversample=oversample,
                           n_iter=n_iter, seed=seed, lissa_scale=lissa_scale, lissa_depth=lissa_depth,
                           lissa_tol=lissa_tol, lissa_batch_rows=lissa_batch_rows)

    cache_path = _cache_path(source, params) if cache else None
    cached = _load_cached(cache_path, source)
    if cached is not None:
        return cached

    p = _fit(method, source, damp, rank, dense=k <= max_dense_k, oversample=oversample, n_iter=n_iter,
             seed=seed, lissa_scale=lissa_scale, lissa_depth=lissa_depth, lissa_tol=lissa_tol,
             lissa_batch_rows=lissa_batch_rows, block_rows=block_rows)
    _save_cached(p, cache_path)
    return p


def _check_rank(method: str, rank: int | None, k: int, max_dense_k: int) -> None:
    """Refuse a ``rank`` that does not fit ``method`` / ``k``, or an exact solve too large to form."""
    if rank is not None:
        if method != "if":
            raise ConfigError(f"rank= applies to method='if' only; got method={method!r} with rank={rank}")
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer; got {rank!r}")
        if rank >= k:
            raise ConfigError(f"rank {rank} must be smaller than the feature dimension k={k}; for r >= k use the "
                              f"exact solver (rank=None)")
    elif method == "if" and k > max_dense_k:
        raise ConfigError(f"the exact 'if' solver forms a {k}x{k} matrix (k > max_dense_k={max_dense_k}); pass "
                          f"rank=r (e.g. 256) for the low-rank + damping solver, or raise max_dense_k")


def _cache_params(method: str, damp: Damping, rank: int | None, drop_nonfinite: bool, *, dense: bool,
                  oversample: int, n_iter: int, seed: int, lissa_scale: float | None, lissa_depth: int,
                  lissa_tol: float, lissa_batch_rows: int | None) -> dict[str, Any]:
    """Every parameter that changes the fitted state (the cache key, with the store fingerprint)."""
    params = {"method": method, "damping": damp.describe(), "rank": rank, "drop_nonfinite": drop_nonfinite}
    if rank is not None:
        params.update(oversample=oversample, n_iter=n_iter, seed=seed)
    if method == "datainf":
        params["dense"] = dense
    if method == "lissa":
        params.update(scale=lissa_scale, depth=lissa_depth, tol=lissa_tol, batch_rows=lissa_batch_rows, seed=seed)
    return params


def _load_cached(cache_path: Path | None, source: FeatureSource) -> Preconditioner | None:
    """The cached preconditioner at ``cache_path``, or None (no cache, or an unreadable entry)."""
    if cache_path is not None and cache_path.exists():
        try:
            return load_preconditioner(cache_path, source)
        except Exception as e:  # a damaged cache entry is refitted, never trusted
            log.warning("ignoring unreadable preconditioner cache %s (%s); refitting", cache_path, e)
    return None


def _fit(method: str, source: FeatureSource, damp: Damping, rank: int | None, *, dense: bool, oversample: int,
         n_iter: int, seed: int, lissa_scale: float | None, lissa_depth: int, lissa_tol: float,
         lissa_batch_rows: int | None, block_rows: int) -> Preconditioner:
    """Fit ``method`` (``if`` exact or low rank, ``datainf``, ``lissa``) on ``source``."""
    if method == "if":
        p: Preconditioner = (_fit_exact(source, damp, block_rows) if rank is None else
                             _fit_lowrank(source, damp, rank, oversample=oversample, n_iter=n_iter, seed=seed,
                                          block_rows=block_rows))
    elif method == "datainf":
        p = _fit_datainf(source, damp, dense, block_rows)
    elif method == "ekfac":
        p = _fit_ekfac(source, damp, block_rows)
    else:
        p = _fit_lissa(source, damp, scale=lissa_scale, depth=lissa_depth, tol=lissa_tol,
                       batch_rows=lissa_batch_rows, seed=seed, block_rows=block_rows)
    return p


def _save_cached(p: Preconditioner, cache_path: Path | None) -> None:
    """Write ``p`` to the cache (if any); a read-only store still scores, it just refits next time."""
    if cache_path is not None:
        try:
            p.save(cache_path)
        except OSError as e:   # a read-only store still scores; it just refits next time
            log.info("could not cache the preconditioner at %s (%s)", cache_path, e)


def _cache_path(source: FeatureSource, params: dict[str, Any]) -> Path | None:
    if not isinstance(source, StoreSource):
        return None
    root = getattr(source.store, "path", None) or getattr(source.store, "root", None)
    fp = source.fingerprint()
    if root is None or fp is None:
        return None
    key = hashlib.sha256(json.dumps({**params, "store": fp, "unit": source.unit_name, "v": _FORMAT_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:16]
    idx = source.store.unit_names.index(source.unit_name)
    return Path(root) / "precond" / f"{idx}-{params['method']}-{key}.npz"


def check_method_projection(method: str, *stores: Any) -> None:
    """Refuse ``kfac`` / ``ekfac`` on a store that was not extracted with the projection it needs (``kfac`` /
    ``pca``); other methods (and ``None`` stores) pass. Every scoring path calls this before any work."""
    kind = STORE_PROJECTION.get(method)
    if kind is None:
        return
    for store in stores:
        if store is None:
            continue
        proj = store.manifest["identity"].get("projection", {})
        if proj.get("kind") != kind:
            from fastinf.errors import StoreMismatchError

            raise StoreMismatchError(
                f"method {method!r} needs stores extracted with the {kind} projection (--proj {kind}16x16@FACTORS "
                f"after `fastinf factors`); {store.path} has {proj.get('kind')!r}: re-extract it with that projection")


def datainf_reference(Q: np.ndarray, G: np.ndarray, damping: float | None = None) -> np.ndarray:
    """The paper's literal DataInf scores in float64, via the N×N train Gram (O(N²k); tests, benchmarks).

    For each train sample i: ``H̃⁻¹g_i = (g_i − (1/N) Σ_j (g_iᵀg_j)/(λ+‖g_j‖²) g_j)/λ``; score ``qᵀ H̃⁻¹ g_i``.
    """
    Q, G = np.asarray(Q, np.float64), np.asarray(G, np.float64)
    N, k = G.shape
    sq = (G * G).sum(1)
    lam = 0.1 * sq.sum() / (N * k) if damping is None else damping
    gram = G @ G.T                                                   # (N, N): the O(N²) object
    pre = (G - (gram / (lam + sq)[None, :]) @ G / N) / lam           # rows: H̃⁻¹ g_i
    return Q @ pre.T
