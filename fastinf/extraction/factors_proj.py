"""Curvature-aware projection matrices from a factor set: eigenbasis (``pca``), mixed (``pcamix``), ``kfac``.

Every linear unit's per-sample gradient is ``∇W̃ = Σ_t g_t x̃_tᵀ`` and the Kronecker projection stores
``P_out ∇W̃ P_inᵀ = Σ_t (P_out g_t)(P_in x̃_t)ᵀ``; any one-sided matrix folds into ``P_out`` / ``P_in`` at no
extraction cost. With the unit's factors ``S = U_S diag(s) U_Sᵀ`` and ``A = U_A diag(a) U_Aᵀ``:

* ``pca``    ``P_out = U_S[:, :k_out]ᵀ``, ``P_in = U_A[:, :k_in]ᵀ``: the gradient's coordinates in the K-FAC
  eigenbasis, truncated to the top eigen-directions (orthonormal rows; at full rank an orthogonal change of
  basis, so inner products are preserved exactly).
* ``pcamix`` the top ``k//2`` eigenvectors plus ``k - k//2`` random directions of the orthogonal complement,
  scaled so that ``E[PᵀP] = I``: unbiased for the full inner product, exact on the top subspace.
* ``kfac``   ``P_out = R_out (S + λ_S I)^{-1/2}``, ``P_in = R_in (A + λ_A I)^{-1/2}`` with the random matrices
  ``R`` of the ``kron`` projection (same seed): the plain inner product of stored features is a
  Johnson-Lindenstrauss estimate of ``vec(∇W_q)ᵀ (A_λ⁻¹ ⊗ S_λ⁻¹) vec(∇W_g)`` (exact at full rank).
  Damping ``λ_A``, ``λ_S``: ``rel:0.1`` by default = 0.1 × the mean eigenvalue of each factor (the usual
  K-FAC heuristic; fastinf's ``if`` default is the same rule).

A side asked for more rows than the unit has dimensions (``k > d``, e.g. 16 rows for a 2-class head) gets the
full eigenbasis padded with zero rows: orthonormal columns, exact on that side (as for ``kron``).
Embedding units: ``A`` is the diagonal of token frequencies, so its eigenbasis is the token basis; keeping
``k_in`` tokens would drop every other token, so the input side stays the random ``P_V`` (``pca``,
``pcamix``) or becomes ``P_V diag(a + λ_A)^{-1/2}`` (``kfac``); the output side is treated as for linear units.
All matrices are float64 (callers cast), deterministic in (factors, spec, unit).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch

from fastinf.errors import ConfigError
from fastinf.extraction.factors_format import Factors, UnitFactors
from fastinf.extraction.projection_spec import CURVATURE_KINDS
from fastinf.extraction.units import Unit

__all__ = ["CURVATURE_KINDS", "curvature_matrices", "open_factors", "check_units_in_factors", "kfac_damping",
           "check_store_factors"]

DEFAULT_KFAC_DAMPING = "rel:0.1"

RandomPair = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


@functools.lru_cache(maxsize=16)
def _open_cached(path: str, fingerprint: str) -> Factors:
    f = Factors.open(path)
    if f.fingerprint != fingerprint:
        raise ConfigError(f"the factors at {path} have fingerprint {f.fingerprint}, expected {fingerprint} "
                          "(they were refitted or replaced); use the factor set the stores were extracted with")
    return f


def open_factors(spec: Any) -> Factors:
    """The factor set of a curvature ``ProjectionSpec`` (opened once per process)."""
    if spec.factors is None:
        raise ConfigError(f"projection {spec} records factors {spec.factors_fp} but no directory to read them from; "
                          f"pass factors=DIR (or '{spec}@DIR')")
    return _open_cached(str(spec.factors), str(spec.factors_fp))


def kfac_damping(spec: Any, mean_eigenvalue: float) -> float:
    """The absolute λ of one factor under ``spec.damping`` (``rel:X``: X × the factor's mean eigenvalue)."""
    from fastinf.scoring.damping import Damping

    return Damping.parse(spec.damping or DEFAULT_KFAC_DAMPING).resolve(mean_eigenvalue)


def check_units_in_factors(units: list[Unit], spec: Any) -> None:
    """Every selected unit must be in the factor set, with the same shape (before any matrix is built)."""
    f = open_factors(spec)
    have = {u.name: u for u in f.units}
    missing = [u.name for u in units if u.name not in have]
    if missing:
        raise ConfigError(f"the factors at {f.path} lack {len(missing)} selected unit(s): {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; fit the factors with --layers covering them")
    for u in units:
        h = have[u.name]
        if (h.d_out, h.d_in, h.bias, h.kind) != (u.d_out, u.d_in, u.bias, u.kind):
            raise ConfigError(f"unit {u.name} is {u.d_out}x{u.d_in} (bias={u.bias}) here but {h.d_out}x{h.d_in} "
                              f"(bias={h.bias}) in the factors at {f.path}: they come from another model")


def _rows(vecs: np.ndarray, k: int) -> torch.Tensor:
    """The top-``k`` eigenvectors (columns of ``vecs``) as rows; zero rows beyond the dimension."""
    d = vecs.shape[0]
    out = torch.zeros(k, d, dtype=torch.float64)
    m = min(k, d)
    out[:m] = torch.from_numpy(np.ascontiguousarray(vecs[:, :m].T))
    return out


def _mixed_rows(vecs: np.ndarray, k: int, random_rows: torch.Tensor) -> torch.Tensor:
    """``k//2`` top eigenvectors and ``k - k//2`` random directions of their orthogonal complement, scaled so
    that ``E[PᵀP] = I`` (``random_rows``: a ``k × d`` random matrix, its first rows are used)."""
    d = vecs.shape[0]
    if k >= d:
        return _rows(vecs, k)
    m = k // 2
    top = torch.from_numpy(np.ascontiguousarray(vecs[:, :m].T))                  # (m, d)
    r = random_rows[: k - m].clone()
    r = r - (r @ top.T) @ top                                                     # into the complement
    q, rr = torch.linalg.qr(r.T, mode="reduced")                                  # (d, k-m) orthonormal
    sign = torch.sign(torch.diagonal(rr))
    sign[sign == 0] = 1.0
    comp = (q * sign).T * math.sqrt((d - m) / (k - m))
    return torch.cat([top, comp])


def _inv_sqrt(evals: np.ndarray, evecs: np.ndarray, lam: float) -> torch.Tensor:
    """``(M + λI)^{-1/2}`` from the eigenpairs of ``M``."""
    v = torch.from_numpy(evecs)
    return (v * torch.from_numpy(1.0 / np.sqrt(evals + lam))) @ v.T


def _out_side(uf: UnitFactors, spec: Any, r_out: torch.Tensor) -> torch.Tensor:
    if spec.kind == "pca":
        return _rows(uf.s_evecs, spec.k_out)
    if spec.kind == "pcamix":
        return _mixed_rows(uf.s_evecs, spec.k_out, r_out)
    return r_out @ _inv_sqrt(uf.s_evals, uf.s_evecs, kfac_damping(spec, float(uf.s_evals.mean())))


def _in_side(uf: UnitFactors, spec: Any, r_in: torch.Tensor) -> torch.Tensor:
    if uf.unit.kind == "embedding":
        if spec.kind != "kfac":
            return r_in
        a = torch.from_numpy(uf.a_diag)
        return r_in / torch.sqrt(a + kfac_damping(spec, float(uf.a_diag.mean())))
    if spec.kind == "pca":
        return _rows(uf.a_evecs, spec.k_in)
    if spec.kind == "pcamix":
        return _mixed_rows(uf.a_evecs, spec.k_in, r_in)
    return r_in @ _inv_sqrt(uf.a_evals, uf.a_evecs, kfac_damping(spec, float(uf.a_evals.mean())))


def curvature_matrices(unit: Unit, spec: Any, random_pair: RandomPair) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_out [k_out, d_out], P_in [k_in, d_in + bias])`` float64 for a ``pca`` / ``pcamix`` / ``kfac`` spec
    (embedding: ``P_in`` is ``[k_in, vocabulary]``). ``random_pair()`` gives the float64 ``kron`` matrices of
    the same unit and seed (used by ``pcamix``, ``kfac`` and the embedding's input side)."""
    if spec.kind not in CURVATURE_KINDS:
        raise ConfigError(f"curvature_matrices needs a pca/pcamix/kfac projection, got {spec.kind!r}")
    uf = open_factors(spec).unit(unit.name)
    r_out, r_in = random_pair()
    return _out_side(uf, spec, r_out).contiguous(), _in_side(uf, spec, r_in).contiguous()


def check_store_factors(factors: Any, *stores: Any) -> None:
    """Provenance check (CLI ``--factors DIR``): every store must be a pca / pcamix / kfac store extracted with
    the factor set at ``factors`` (by fingerprint); factors of another model, other data or a refit are refused
    naming both fingerprints. ``None`` stores are skipped."""
    f = Factors.open(factors)
    for store in stores:
        if store is None:
            continue
        proj = store.manifest["identity"].get("projection", {})
        if proj.get("kind") not in CURVATURE_KINDS:
            raise ConfigError(f"--factors {f.path}: store {store.path} has the {proj.get('kind')!r} projection, not "
                              "one built from factors (pca / pcamix / kfac); drop --factors or re-extract it")
        if proj.get("factors") != f.fingerprint:
            raise ConfigError(f"store {store.path} was extracted with factors {proj.get('factors')}, but {f.path} "
                              f"holds {f.fingerprint} (another model, data or refit); pass the factor set the "
                              "stores were extracted with")
