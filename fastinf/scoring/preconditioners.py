"""The preconditioner classes: fitted states mapping test features ``Q`` [M, k] to ``Q H⁻¹``.

Identity, dense (exact ``if`` / DataInf matrix), low rank (Woodbury), streaming DataInf and LiSSA, plus
their on-disk form (``save`` / :func:`load_preconditioner`). How each is fitted from train features
lives in ``fastinf.scoring.curvature``; this module only holds what a fitted one is and does.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError, StoreError
from fastinf.scoring.sources import (
    DEFAULT_BLOCK_ROWS,
    ArrayLike,
    ArraySource,
    FeatureSource,
    StoreSource,
    nonfinite_error,
    to_tensor,
)

__all__ = ["Preconditioner", "IdentityPreconditioner", "DensePreconditioner", "LowRankPreconditioner",
           "DiagonalPreconditioner", "StreamingDataInfPreconditioner", "LissaPreconditioner", "load_preconditioner", "RESIDENT_BYTES"]

RESIDENT_BYTES = 64 << 20   # LiSSA keeps G in memory (float64) up to this size instead of re-reading it each step


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


class DiagonalPreconditioner(Preconditioner):
    """``H⁻¹ = diag(1/(Λ + λ))``: EK-FAC in the eigenbasis (``Λ_j = E[φ_j²]`` over the train features of a
    ``pca`` store). Applied to the test side only, so scores stay one GEMM and FAISS-compatible."""

    def __init__(self, method: str, eigenvalues: np.ndarray, damping: float, n: int) -> None:
        self.method = method
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.k = self.eigenvalues.shape[0]
        self.damping, self.n = float(damping), int(n)
        self._w_t = to_tensor(1.0 / (self.eigenvalues + self.damping))

    def _apply64(self, q: torch.Tensor) -> torch.Tensor:
        return q * self._w_t

    def _state(self) -> dict[str, np.ndarray]:
        return {"eigenvalues": self.eigenvalues}


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
    if isinstance(source, StoreSource):   # checksummed random access (never a corrupt chunk silently)
        g = source.store.gather(source.unit_name, rows)
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
    if cls == "DiagonalPreconditioner":
        return DiagonalPreconditioner(meta["method"], arrays["eigenvalues"], meta["damping"], meta["n"])
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
