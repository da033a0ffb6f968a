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
- ``lissa``     — the LiSSA recursion ``h ← v + h − (H h)/s`` (``H`` damped, ``s`` ≥ its top eigenvalue),
  ``H⁻¹v = h/s``. A slow reference solver that converges to the exact ``if`` answer.

Damping is given absolutely (``Damping(1e-3)``, CLI ``--damping 1e-3``) or relative to the mean
eigenvalue of ``GᵀG/N`` (``Damping(0.1, relative=True)``, CLI ``--damping rel:0.1``); the mean eigenvalue
``Σ‖g‖²/(N·k)`` is exact (a trace), so relative damping costs nothing extra.

Fitted preconditioners are saved next to the train store under ``precond/`` (key: unit, method and
every parameter, plus the store fingerprint) and reused by later calls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from fastinf.errors import ConfigError, NonFiniteError, StoreError

__all__ = [
    "Damping", "Preconditioner", "IdentityPreconditioner", "DensePreconditioner", "LowRankPreconditioner",
    "StreamingDataInfPreconditioner", "LissaPreconditioner", "FeatureSource", "ArraySource",
    "StoreSource", "fit_preconditioner", "load_preconditioner", "datainf_reference", "store_fingerprint",
    "nonfinite_error", "as_source", "to_tensor", "METHODS",
]

log = logging.getLogger(__name__)

METHODS = ("identity", "if", "datainf", "lissa")
MAX_DENSE_K = 4096          # above this, k x k float64 matrices (128 MB) are not formed by default
DEFAULT_BLOCK_ROWS = 16384  # rows of G per streamed block when fitting
RESIDENT_BYTES = 64 << 20   # LiSSA keeps G in memory (float64) up to this size instead of re-reading it each step
_FORMAT_VERSION = 1

ArrayLike = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# damping
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Damping:
    """The damping λ of ``H = GᵀG/N + λI``: absolute, or ``value`` × the mean eigenvalue of ``GᵀG/N``."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"damping must be a finite number > 0; got {self.value!r}. Use e.g. 1e-3 "
                              f"(absolute) or 'rel:0.1' (0.1 x the mean eigenvalue of the Gauss-Newton matrix)")

    @classmethod
    def parse(cls, spec: Damping | float | str | None, default: Damping | None = None) -> Damping | None:
        """``1e-3`` / ``"1e-3"`` → absolute; ``"rel:0.1"`` → relative; ``None`` → ``default``."""
        if spec is None:
            return default
        if isinstance(spec, Damping):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(float(spec))
        if isinstance(spec, str):
            text = spec.strip().lower()
            relative = text.startswith("rel:")
            try:
                value = float(text[4:] if relative else text)
            except ValueError:
                raise ConfigError(f"cannot parse damping {spec!r}: expected a number (absolute, e.g. 1e-3) "
                                  f"or 'rel:X' (X times the mean eigenvalue, e.g. rel:0.1)") from None
            return cls(value, relative)
        raise ConfigError(f"damping must be a number, 'rel:X' or a Damping; got {type(spec).__name__}")

    def resolve(self, mean_eigenvalue: float) -> float:
        """The absolute λ for a unit whose ``GᵀG/N`` has this mean eigenvalue."""
        if not self.relative:
            return float(self.value)
        lam = float(self.value) * float(mean_eigenvalue)
        if not lam > 0:
            raise ConfigError(f"relative damping {self.value} x mean eigenvalue {mean_eigenvalue:g} gives "
                              f"λ = {lam:g}, which is not > 0 (all train features are zero?); give an "
                              f"absolute damping instead")
        return lam

    def describe(self) -> str:
        return f"rel:{self.value:g}" if self.relative else f"{self.value:g}"


DEFAULT_IF_DAMPING = Damping(0.1, relative=True)
DATAINF_DAMPING = Damping(0.1, relative=True)   # λ = 0.1 · Σ‖g‖² / (N·k), DataInf's closed form


# ----------------------------------------------------------------------------------------------------
# feature sources: blocks of one unit's train features, with non-finite rows refused or dropped
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# preconditioners
# ----------------------------------------------------------------------------------------------------
def _to64(Q: ArrayLike) -> torch.Tensor:
    t = Q if isinstance(Q, torch.Tensor) else to_tensor(np.ascontiguousarray(Q))
    return t.detach().to(dtype=torch.float64, device="cpu")


def _like(out: torch.Tensor, Q: ArrayLike) -> ArrayLike:
    """Return ``out`` in the container and (floating) dtype of ``Q``, float32 for non-float inputs."""
    if isinstance(Q, torch.Tensor):
        dtype = Q.dtype if Q.dtype in (torch.float32, torch.float64) else torch.float32
        return out.to(device=Q.device, dtype=dtype)
    dtype = Q.dtype if Q.dtype in (np.float32, np.float64) else np.float32
    return out.numpy().astype(dtype, copy=False)


class Preconditioner(ABC):
    """Maps test features to ``Q H⁻¹`` for one unit (so that ``score = apply(Q) @ Gᵀ``)."""

    method: str
    k: int
    damping: float      # the resolved absolute λ (0 for identity)
    n: int              # train rows it was fitted on

    def apply(self, Q: ArrayLike) -> ArrayLike:
        """``Q H⁻¹`` for ``Q`` [M, k] (numpy or torch); computed in float64, returned in Q's float dtype."""
        q = _to64(Q)
        if q.ndim != 2 or q.shape[1] != self.k:
            raise ConfigError(f"{self.method} preconditioner expects queries [M, {self.k}]; got {tuple(q.shape)}")
        return _like(self._apply64(q), Q)

    @abstractmethod
    def _apply64(self, q: torch.Tensor) -> torch.Tensor: ...

    def _state(self) -> dict[str, np.ndarray]:
        return {}

    def _meta(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "damping": self.damping, "n": self.n,
                "class": type(self).__name__}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (``.npz`` with the arrays and a JSON header) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(self._meta()).encode(), dtype=np.uint8),
                     **self._state())
        os.replace(tmp, path)


class IdentityPreconditioner(Preconditioner):
    """``H = I``: graddot / TracIn."""

    method = "identity"

    def __init__(self, k: int, n: int = 0) -> None:
        self.k, self.n, self.damping = int(k), int(n), 0.0

    def apply(self, Q: ArrayLike) -> ArrayLike:
        if Q.shape[-1] != self.k:
            raise ConfigError(f"identity preconditioner expects queries [M, {self.k}]; got {tuple(Q.shape)}")
        return Q

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        return q


class DensePreconditioner(Preconditioner):
    """A fitted symmetric k×k ``H⁻¹`` (exact ``if`` via eigendecomposition, or DataInf's matrix form)."""

    def __init__(self, method: str, inverse: np.ndarray, damping: float, n: int,
                 eigenvalues: np.ndarray | None = None) -> None:
        self.method = method
        self.inverse = np.asarray(inverse, dtype=np.float64)
        self.k = self.inverse.shape[0]
        self.damping, self.n = float(damping), int(n)
        self.eigenvalues = None if eigenvalues is None else np.asarray(eigenvalues, dtype=np.float64)
        self._inv_t = to_tensor(self.inverse)

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        return q @ self._inv_t          # H⁻¹ symmetric: Q H⁻¹

    def _state(self) -> dict[str, np.ndarray]:
        s = {"inverse": self.inverse}
        if self.eigenvalues is not None:
            s["eigenvalues"] = self.eigenvalues
        return s


class LowRankPreconditioner(Preconditioner):
    """Woodbury form ``H⁻¹ = U diag(1/(Λ+λ) − 1/λ) Uᵀ + I/λ`` with ``U`` [k, r] orthonormal."""

    method = "if"

    def __init__(self, U: np.ndarray, eigenvalues: np.ndarray, damping: float, n: int) -> None:
        self.U = np.asarray(U, dtype=np.float64)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.k, self.rank = self.U.shape
        self.damping, self.n = float(damping), int(n)
        lam = self.damping
        self.w = 1.0 / (self.eigenvalues + lam) - 1.0 / lam
        self._U_t, self._w_t = to_tensor(self.U), to_tensor(self.w)

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        return ((q @ self._U_t) * self._w_t) @ self._U_t.T + q / self.damping   # (M,r)(r)(r,k) + (M,k)

    def _state(self) -> dict[str, np.ndarray]:
        return {"U": self.U, "eigenvalues": self.eigenvalues}

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "rank": self.rank}


class StreamingDataInfPreconditioner(Preconditioner):
    """DataInf for large k: ``Q̃ = Q/λ − (1/(Nλ)) ((Q Gᵀ) ⊙ 1/(λ+‖g‖²)) G``, one pass over G per apply."""

    method = "datainf"

    def __init__(self, source: FeatureSource, damping: float, n: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        self.source, self.k, self.damping, self.n = source, source.k, float(damping), int(n)
        self.block_rows = block_rows

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        lam = self.damping
        acc = torch.zeros_like(q)
        for g in self.source.blocks(self.block_rows):
            g = to_tensor(g).to(torch.float64)                     # (b, k)
            coef = (q @ g.T) / (lam + (g * g).sum(1))                     # (M, b)
            acc += coef @ g                                              # (M, k)
        return q / lam - acc / (self.n * lam)


class LissaPreconditioner(Preconditioner):
    """LiSSA: ``h_{j+1} = v + h_j − ((GᵀG/N + λI) h_j)/s``; ``H⁻¹v = h_J/s`` (reference solver).

    ``batch_rows=None`` uses the full ``GᵀG/N`` each step (deterministic; one pass per step); an
    integer draws a random block of that many rows per step (seeded), the classic stochastic form.
    Stops after ``depth`` steps, or earlier when the relative change drops below ``tol``.
    """

    method = "lissa"

    def __init__(self, source: FeatureSource, damping: float, n: int, scale: float, *, depth: int = 1000,
                 tol: float = 1e-10, batch_rows: int | None = None, seed: int = 0,
                 block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        self.source, self.k, self.damping, self.n = source, source.k, float(damping), int(n)
        self.scale, self.depth, self.tol = float(scale), int(depth), float(tol)
        self.batch_rows, self.seed, self.block_rows = batch_rows, int(seed), block_rows
        self.steps_taken = 0

    def _hvp(self, h: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """``h (GᵀG/N)`` for row vectors h [M, k] (full pass, or one random row batch)."""
        if rng is None:
            if self._resident is not None:
                return (h @ self._resident.T) @ self._resident / self.n
            out = torch.zeros_like(h)
            for g in self.source.blocks(self.block_rows):
                g = to_tensor(g).to(torch.float64)
                out += (h @ g.T) @ g
            return out / self.n
        rows = np.sort(rng.choice(self.source.n, size=min(self.batch_rows, self.source.n), replace=False))
        g = to_tensor(_gather_rows(self.source, rows)).to(torch.float64)
        return (h @ g.T) @ g / len(g)

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        rng = None if self.batch_rows is None else np.random.default_rng(self.seed)
        self._resident = None
        if rng is None and self.source.n * self.k * 8 <= RESIDENT_BYTES:   # small G: read it once, not per step
            self._resident = torch.cat([to_tensor(g).to(torch.float64) for g in self.source.blocks(self.block_rows)])
        h = q.clone()
        for step in range(self.depth):
            new = q + h - (self._hvp(h, rng) + self.damping * h) / self.scale
            delta = float((new - h).norm() / max(float(new.norm()), 1e-300))
            h = new
            self.steps_taken = step + 1
            if rng is None and delta < self.tol:
                break
        self._resident = None
        return h / self.scale

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "scale": self.scale, "depth": self.depth, "tol": self.tol,
                "batch_rows": self.batch_rows, "seed": self.seed}


def _gather_rows(source: FeatureSource, rows: np.ndarray) -> np.ndarray:
    if isinstance(source, StoreSource):
        from fastinf.store.gradient_store import from_storage

        g = from_storage(source.store.features(source.unit_name)[rows], source.store.dtype)
    elif isinstance(source, ArraySource):
        g = np.asarray(source._g[rows], dtype=np.float32)
    else:
        raise ConfigError("stochastic LiSSA needs random row access (a store or an array source)")
    finite = np.isfinite(g).all(axis=1)
    if not finite.all():
        if not source.drop_nonfinite:
            raise nonfinite_error(source.name, source.ids(rows[~finite]))
        g = g[finite]
    return g


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
        method: ``identity`` | ``if`` | ``datainf`` | ``lissa`` (see the module docstring).
        damping: λ, absolute (``1e-3``) or relative (``"rel:0.1"`` = 0.1 × mean eigenvalue of GᵀG/N).
            Defaults: ``if``/``lissa`` rel:0.1; ``datainf`` its closed form (also rel:0.1).
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
    params = {"method": method, "damping": damp.describe(), "rank": rank, "drop_nonfinite": drop_nonfinite}
    if rank is not None:
        params.update(oversample=oversample, n_iter=n_iter, seed=seed)
    if method == "datainf":
        params["dense"] = k <= max_dense_k
    if method == "lissa":
        params.update(scale=lissa_scale, depth=lissa_depth, tol=lissa_tol, batch_rows=lissa_batch_rows, seed=seed)

    cache_path = _cache_path(source, params) if cache else None
    if cache_path is not None and cache_path.exists():
        try:
            return load_preconditioner(cache_path, source)
        except Exception as e:  # a damaged cache entry is refitted, never trusted
            log.warning("ignoring unreadable preconditioner cache %s (%s); refitting", cache_path, e)

    if method == "if":
        p: Preconditioner = (_fit_exact(source, damp, block_rows) if rank is None else
                             _fit_lowrank(source, damp, rank, oversample=oversample, n_iter=n_iter, seed=seed,
                                          block_rows=block_rows))
    elif method == "datainf":
        p = _fit_datainf(source, damp, k <= max_dense_k, block_rows)
    else:
        p = _fit_lissa(source, damp, scale=lissa_scale, depth=lissa_depth, tol=lissa_tol,
                       batch_rows=lissa_batch_rows, seed=seed, block_rows=block_rows)
    if cache_path is not None:
        try:
            p.save(cache_path)
        except OSError as e:   # a read-only store still scores; it just refits next time
            log.info("could not cache the preconditioner at %s (%s)", cache_path, e)
    return p


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


def load_preconditioner(path: str | os.PathLike, source: FeatureSource | None = None) -> Preconditioner:
    """Read a preconditioner written by :meth:`Preconditioner.save`.

    Streaming ones (``datainf`` for large k, ``lissa``) keep only their scalars on disk and need the
    train ``source`` they were fitted on.
    """
    with np.load(path) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        arrays = {name: z[name] for name in z.files if name != "__meta__"}
    cls = meta["class"]
    if cls == "DensePreconditioner":
        return DensePreconditioner(meta["method"], arrays["inverse"], meta["damping"], meta["n"],
                                   arrays.get("eigenvalues"))
    if cls == "LowRankPreconditioner":
        return LowRankPreconditioner(arrays["U"], arrays["eigenvalues"], meta["damping"], meta["n"])
    if cls == "IdentityPreconditioner":
        return IdentityPreconditioner(meta["k"], meta["n"])
    if source is None:
        raise ConfigError(f"{cls} streams over its train features; pass the source it was fitted on")
    if cls == "StreamingDataInfPreconditioner":
        return StreamingDataInfPreconditioner(source, meta["damping"], meta["n"])
    if cls == "LissaPreconditioner":
        return LissaPreconditioner(source, meta["damping"], meta["n"], meta["scale"], depth=meta["depth"],
                                   tol=meta["tol"], batch_rows=meta["batch_rows"], seed=meta["seed"])
    raise StoreError(f"unknown preconditioner class {cls!r} in {path}; it was written by another fastinf version")


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

