"""Projection of per-sample unit gradients to fixed-size features, without forming the gradients.

For a linear unit ``y = x Wᵀ (+ b)`` the per-sample gradient is ``∇W = Σ_t g_t x_tᵀ`` (``g = ∂ℓ/∂y``).
The operators, by ``ProjectionSpec.kind`` (``fastinf.extraction.projection_spec``) and unit kind:

* ``kron`` (default, 16×16): ``φ = P_out ∇W P_inᵀ = Σ_t (P_out g_t)(P_in [x_t, 1])ᵀ`` — two thin GEMMs
  over all tokens and one batched ``k_out×T @ T×k_in`` product; cost O(B·T·(d_out·k_out + d_in·k_in)).
* ``pca`` / ``pcamix`` / ``kfac``: the same Kronecker operator with matrices built from a factor set
  (eigenbasis, eigenbasis + random complement, K-FAC whitening; ``fastinf.extraction.factors_proj``).
* embedding gather: ``x_t`` is one-hot, so ``P_in x_t`` is column ``id_t`` of ``P_V`` — a gather.
* ``exact``: ``∇W`` itself, flattened row-major (d_out × d_in), then ``∇b`` when the unit has a bias.
  Meant for small units (LoRA, heads) and for tests; cost O(B·T·d_out·d_in).

Matrices are deterministic functions of ``(seed, unit name, unit shape, side)`` through a SHA-256
derived generator seed (never Python's salted ``hash``), generated on CPU in float64, orthonormalised
by a sign-fixed QR (unique, so identical across LAPACK builds) and scaled so that inner products are
preserved in expectation: ``E[PᵀP] = I``. With ``k ≥ d`` the columns are orthonormal and ``PᵀP = I``
exactly. They are cached per process and cast to float32.

``_kron_project`` and ``_embed_project`` are the torch paths of ``fastinf.kernels.kron_project`` /
``embed_project`` (same argument semantics). ``UnitProjector.project`` asks the kernels' dispatch
(``fastinf.kernels.backend_for``: CUDA tensors by default, ``FASTINF_KERNELS`` / ``use_backend`` to
force) and sends Triton-bound calls to the kernels, everything else to the torch functions here.
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch

from fastinf.errors import ConfigError
from fastinf.extraction.projection_spec import CURVATURE_KINDS, ProjectionSpec
from fastinf.extraction.units import Unit

__all__ = ["ProjectionSpec", "CURVATURE_KINDS", "feature_dim", "projection_matrices", "UnitProjector", "check_fits",
           "make_projectors"]


def feature_dim(unit: Unit, spec: ProjectionSpec) -> int:
    """Length of one sample's feature vector for ``unit`` under ``spec``."""
    return unit.exact_dim if spec.kind == "exact" else spec.k_out * spec.k_in


# ---------------------------------------------------------------------------------------------- matrices

def _derived_seed(seed: int, unit_name: str, shape: tuple[int, int], bias: bool, side: str) -> int:
    """A 63-bit generator seed that depends only on its arguments (stable across runs and machines)."""
    key = f"fastinf-proj-v1|{seed}|{unit_name}|{shape[0]}x{shape[1]}|bias={int(bias)}|{side}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _orthonormal_rows(k: int, d: int, gen_seed: int) -> torch.Tensor:
    """A ``k × d`` float64 matrix ``P`` with ``E[PᵀP] = I``.

    ``k <= d``: orthonormal rows scaled by ``sqrt(d/k)`` (a scaled random k-dim subspace; ``PPᵀ = (d/k)
    I``). ``k > d``: orthonormal columns (``PᵀP = I`` exactly). QR signs are fixed (``diag(R) > 0``) so
    that the factorisation, and the matrix, are unique.
    """
    gen = torch.Generator(device="cpu").manual_seed(gen_seed)
    a = torch.randn(max(k, d), min(k, d), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a, mode="reduced")  # (max, min) with orthonormal columns
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    q = q * sign
    if k <= d:
        return q.T.contiguous() * math.sqrt(d / k)  # (k, d) orthonormal rows
    return q.contiguous()  # (k, d) orthonormal columns


@functools.lru_cache(maxsize=4096)
def _cached_matrices(name: str, d_out: int, d_in: int, bias: bool, k_out: int, k_in: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (d_out, d_in)
    # Thin QRs are tiny: one thread is faster than a thread pool (which stalls on a busy machine), and
    # the result does not depend on the thread count either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p_out = _orthonormal_rows(k_out, d_out, _derived_seed(seed, name, shape, bias, "out"))
        p_in = _orthonormal_rows(k_in, d_in + int(bias), _derived_seed(seed, name, shape, bias, "in"))
    finally:
        torch.set_num_threads(threads)
    return p_out.float(), p_in.float()


def _random64(unit: Unit, spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 ``kron`` matrices of ``unit`` under ``spec``'s seed and dims (uncached)."""
    shape, bias = (unit.d_out, unit.d_in), unit.bias
    return (_orthonormal_rows(spec.k_out, unit.d_out, _derived_seed(spec.seed, unit.name, shape, bias, "out")),
            _orthonormal_rows(spec.k_in, unit.d_in + int(bias), _derived_seed(spec.seed, unit.name, shape, bias, "in")))


@functools.lru_cache(maxsize=1024)
def _curvature64(unit: Unit, spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    from fastinf.extraction.factors_proj import curvature_matrices

    return curvature_matrices(unit, spec, lambda: _random64(unit, spec))


def _matrices(unit: Unit, spec: ProjectionSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``projection_matrices`` in ``dtype``; curvature kinds are built in float64 (exact float64 references)."""
    if spec.kind in CURVATURE_KINDS:
        p_out, p_in = _curvature64(unit, spec)
        return p_out.to(dtype), p_in.to(dtype)
    p_out, p_in = projection_matrices(unit, spec)
    return p_out.to(dtype), p_in.to(dtype)


def projection_matrices(unit: Unit, spec: ProjectionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_out [k_out, d_out], P_in [k_in, d_in + bias])``, float32 on CPU, deterministic in
    (spec.seed, unit.name, unit.shape) — and the factors for pca/pcamix/kfac. For the embedding, ``P_in`` is
    ``P_V`` (k_in × vocabulary). The returned tensors may be shared (cached): do not modify them in place."""
    if spec.kind == "exact":
        raise ConfigError("projection_matrices needs a 'kron' ProjectionSpec (or pca, pcamix, kfac), got "
                          "'exact' (exact mode has no matrices).")
    if spec.kind in CURVATURE_KINDS:
        return _matrices(unit, spec, torch.float32)
    return _cached_matrices(unit.name, unit.d_out, unit.d_in, unit.bias, spec.k_out, spec.k_in, spec.seed)


# ---------------------------------------------------------------------------------------------- torch paths

def _as_btd(t: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, 1, d); (B, T, d) unchanged; (B, ..., d) folded to (B, T', d)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (exact references)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _project_in(x: torch.Tensor, P_in: torch.Tensor, bias: bool) -> torch.Tensor:
    """``P_in [x_t, 1]`` for every token, token-minor: x [B, T, d_in] (or [B, d_in]) -> [k_in, B*T].

    Written as ``P @ Xᵀ`` (k rows of output) rather than ``X @ Pᵀ``: BLAS runs the k-row product far
    better than the skinny k-column one. The bias column is added as a broadcast, not an extra GEMM.
    """
    x = _as_btd(x)
    B, T, d_in = x.shape
    P = P_in.to(_acc_dtype(x))
    px = P[:, :d_in] @ x.reshape(B * T, d_in).to(P.dtype).T                    # (k_in, B*T)
    if bias:
        px += P[:, d_in:d_in + 1]
    return px


def _project_out(g: torch.Tensor, P_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``m_t P_out g_t`` for every token, token-minor: g [B, T, d_out] -> [k_out, B*T]. The mask is
    applied after the projection (k_out numbers per token instead of d_out)."""
    g = _as_btd(g)
    B, T, d_out = g.shape
    P = P_out.to(_acc_dtype(g))
    pg = P @ g.reshape(B * T, d_out).to(P.dtype).T                             # (k_out, B*T)
    if mask is not None:
        pg *= mask.reshape(1, B * T).to(pg.dtype)
    return pg


def _kron_combine(pg: torch.Tensor, px: torch.Tensor, B: int) -> torch.Tensor:
    """``φ_b = Σ_t pg[:, b, t] px[:, b, t]ᵀ``: [k_out, B*T] x [k_in, B*T] -> [B, k_out, k_in]."""
    k_out, k_in = pg.shape[0], px.shape[0]
    T = pg.shape[1] // B
    return torch.bmm(pg.view(k_out, B, T).transpose(0, 1), px.view(k_in, B, T).permute(1, 2, 0))


def _kron_project(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_in: torch.Tensor,
                  P_out: torch.Tensor, bias: bool) -> torch.Tensor:
    """``φ_b = Σ_t m_bt (P_out g_bt)(P_in [x_bt, 1])ᵀ`` -> ``[B, k_out, k_in]`` float32.

    x: [B, T, d_in] (or [B, d_in]: one token), g: [B, T, d_out], mask: [B, T] (1 keep, 0 drop) or
    None; P_in: [k_in, d_in + bias], P_out: [k_out, d_out]. Both sides are projected first (two GEMMs
    over all B·T tokens), then one batched (k_out × T) @ (T × k_in) product; ``∇W`` is never formed.
    """
    B = x.shape[0]
    return _kron_combine(_project_out(g, P_out, mask), _project_in(x, P_in, bias), B)


def _embed_project(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, P_V: torch.Tensor,
                   P_out: torch.Tensor) -> torch.Tensor:
    """``φ_b = Σ_t m_bt (P_out g_bt) P_V[:, id_bt]ᵀ`` -> ``[B, k_out, k_in]`` float32.

    ids: [B, T] long, g: [B, T, d], mask: [B, T] or None, P_V: [k_in, V], P_out: [k_out, d].
    """
    if ids.dim() == 1:
        ids = ids.unsqueeze(1)
    B, T = ids.shape
    pg = _project_out(g, P_out, mask)                                         # (k_out, B*T)
    px = P_V.T.to(pg.dtype)[ids.reshape(-1)].T                                # (k_in, B*T) gather
    return _kron_combine(pg, px, B)


def _exact_linear(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, bias: bool) -> torch.Tensor:
    """``[∇W.flatten() (d_out × d_in row-major), ∇b]`` per sample -> [B, exact_dim] float32 (float64
    for float64 inputs)."""
    dt = _acc_dtype(g)
    x, g = _as_btd(x).to(dt), _as_btd(g).to(dt)
    B, T, _ = x.shape
    if mask is not None:
        g = g * mask.reshape(B, T, 1).to(dt)
    gw = torch.bmm(g.transpose(1, 2), x).reshape(B, -1)                       # (B, d_out*d_in)
    if bias:
        gw = torch.cat([gw, g.sum(dim=1)], dim=1)
    return gw


def _exact_embedding(ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """``∇(Eᵀ)`` (hidden × vocabulary, row-major) per sample -> [B, d * V] (a scatter-add)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(1)
    B, T = ids.shape
    dt = _acc_dtype(g)
    g = _as_btd(g).to(dt)
    if mask is not None:
        g = g * mask.reshape(B, T, 1).to(dt)
    d = g.shape[-1]
    rows = torch.zeros(B, vocab, d, dtype=dt, device=g.device)                # ∇E per sample (B, V, d)
    rows.scatter_add_(1, ids.unsqueeze(-1).expand(B, T, d), g)
    return rows.transpose(1, 2).reshape(B, -1)


# ---------------------------------------------------------------------------------------------- dispatch

@functools.lru_cache(maxsize=1)
def _kernels_module():
    """``fastinf.kernels`` if it is importable (it imports no Triton until a kernel is launched)."""
    try:
        import fastinf.kernels as kernels  # noqa: PLC0415
    except ImportError:
        return None
    return kernels if hasattr(kernels, "backend_for") else None


def _kernels_for(*tensors: torch.Tensor):
    """``fastinf.kernels`` when its dispatch sends a call on ``tensors`` to the Triton kernels (CUDA
    tensors by default; ``FASTINF_KERNELS`` / ``fastinf.kernels.use_backend`` override), else None (the
    torch functions of this module serve the call)."""
    kernels = _kernels_module()
    if kernels is None:
        return None
    return kernels if kernels.backend_for(*tensors) == "triton" else None


class UnitProjector:
    """Turns one unit's captured ``(x, g, mask)`` into per-sample features ``[B, feature_dim]`` (float32;
    float64 when the model runs in float64, e.g. for exact references).

    ``x`` is the unit input ([B, T, d_in] or [B, d_in]; token ids [B, T] for the embedding), ``g`` the
    gradient of the summed per-sample loss w.r.t. the unit output (same leading shape, last dim d_out),
    ``mask`` [B, T] with 1 for real tokens (None: keep all). The matrices are moved to ``device`` once.
    """

    def __init__(self, unit: Unit, spec: ProjectionSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.unit = unit
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.dim = feature_dim(unit, spec)
        if spec.kind != "exact":
            p_out, p_in = _matrices(unit, spec, dtype)
            self.P_out = p_out.to(self.device)
            if unit.kind == "embedding":  # P_V [k_in, V] as a view of a (V, k_in) matrix: row gathers
                self.P_in = p_in.T.contiguous().to(self.device).T
            else:
                self.P_in = p_in.to(self.device)
        else:
            self.P_out = self.P_in = None

    def __repr__(self) -> str:
        return f"UnitProjector({self.unit.name!r}, {self.spec}, dim={self.dim}, device={self.device})"

    def project(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features ``[B, feature_dim]`` float32 (see the class docstring for shapes)."""
        u = self.unit
        if g.shape[-1] != u.d_out:
            raise ConfigError(f"Unit {u.name}: output gradient has last dim {g.shape[-1]}, expected d_out={u.d_out}.")
        B = g.shape[0]
        if u.kind == "embedding":
            if x.dtype not in (torch.long, torch.int32, torch.int64):
                raise ConfigError(f"Embedding unit {u.name}: expected integer token ids, got {x.dtype}.")
            if self.spec.kind == "exact":
                return _exact_embedding(x, g, mask, u.d_in)
            k = _kernels_for(g)
            if k is not None:
                ids = x if x.dim() == 2 else x.reshape(B, -1)
                return k.embed_project(ids, _as_btd(g), mask, self.P_in, self.P_out).reshape(B, -1)
            return _embed_project(x, g, mask, self.P_in, self.P_out).reshape(B, -1)
        if x.shape[-1] != u.d_in:
            raise ConfigError(f"Unit {u.name}: input has last dim {x.shape[-1]}, expected d_in={u.d_in}.")
        if self.spec.kind == "exact":
            return _exact_linear(x, g, mask, u.bias)
        k = _kernels_for(x, g)
        if k is not None:
            x3, g3 = _as_btd(x), _as_btd(g)
            m = mask if mask is not None and mask.shape == x3.shape[:2] else None
            return k.kron_project(x3, g3, m, self.P_in, self.P_out, bias=u.bias).reshape(B, -1)
        return _kron_project(x, g, mask, self.P_in, self.P_out, u.bias).reshape(B, -1)


def check_fits(units: list[Unit], spec: ProjectionSpec) -> None:
    """Refuse (never cap) a Kronecker projection larger than the selected units can use.

    A unit's gradient is ``d_out x (d_in + bias)``; projecting it to more than that adds no information,
    only bytes. Refused, with the unit and its dims named: a ``k_out`` or ``k_in`` above every dimension of
    every selected unit (no unit has that many features on either side), and a unit that the projection
    exceeds on both sides (its features would outnumber its exact gradient). A projection larger on one
    side only (e.g. 16x16 on a 2-class head) stays allowed: its matrix has orthonormal columns and
    preserves inner products exactly. Called before any matrix is generated or file allocated.
    """
    if spec.kind == "exact" or not units:
        return
    if spec.kind in CURVATURE_KINDS:  # every unit must be in the factors, with its shape
        from fastinf.extraction.factors_proj import check_units_in_factors

        check_units_in_factors(units, spec)
    widest = max(units, key=lambda u: max(u.d_out, u.d_in + int(u.bias)))
    d_max = max(widest.d_out, widest.d_in + int(widest.bias))
    if max(spec.k_out, spec.k_in) > d_max:
        raise ConfigError(f"projection {spec} is larger than any dimension of the selected units (the largest "
                          f"is {widest.name!r}, {widest.d_out} x {widest.d_in}{' + bias' if widest.bias else ''}); "
                          "fastinf refuses oversized projections instead of capping them: use KOUTxKIN with both "
                          f"at most {d_max} (e.g. 16x16), or --proj exact")
    for u in units:
        d_in = u.d_in + int(u.bias)
        if spec.k_out > u.d_out and spec.k_in > d_in:
            raise ConfigError(f"projection {spec} is larger than unit {u.name!r} ({u.d_out} x {u.d_in}"
                              f"{' + bias' if u.bias else ''}) on both sides: its {spec.k_out * spec.k_in} features "
                              f"would exceed its exact gradient ({u.exact_dim}); fastinf refuses it instead of "
                              f"capping: use at most {u.d_out}x{d_in} for this unit, another --layers "
                              "selection, or --proj exact")


def make_projectors(units: list[Unit], spec: ProjectionSpec, device: torch.device | str = "cpu") -> dict[str, UnitProjector]:
    """One ``UnitProjector`` per unit, keyed by unit name."""
    return {u.name: UnitProjector(u, spec, device) for u in units}
