"""The GEMM estimators: graddot, gradcos, tracin, if, datainf, lissa (and selfinf, repsim).

Array kernels (``score_arrays``: one unit from in-memory features) and the blocked store loops that
``score()`` runs: ``_score_pairwise`` (one GEMM per unit, test block and train block, summed over tracin
checkpoints), ``_score_selfinf`` (one row ``−g_iᵀ H⁻¹ g_i``) and ``_score_repsim`` (cosine of hidden
representations).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError
from fastinf.scoring.curvature import fit_preconditioner
from fastinf.scoring.planning import _dtype, _Plan, _test_blocks, _train_block_rows
from fastinf.scoring.preconditioners import IdentityPreconditioner, Preconditioner
from fastinf.scoring.scores import ScoreSetWriter
from fastinf.scoring.setups import _raise_nonfinite
from fastinf.scoring.sources import to_tensor

__all__ = ["score_arrays"]

_CURVATURE = {"graddot": "identity", "gradcos": "identity", "tracin": "identity", "if": "if",
              "datainf": "datainf", "lissa": "lissa", "kfac": "identity", "ekfac": "ekfac"}


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norm in float64; all-zero rows stay zero)."""
    norms = x.to(torch.float64).norm(dim=1, keepdim=True)
    return (x.to(torch.float64) / norms.clamp_min(1e-300)).to(x.dtype)


def _prepare_queries(method: str, q: torch.Tensor, precond: Preconditioner) -> torch.Tensor:
    """The test side of one block: ``Q H⁻¹`` (or unit rows for gradcos)."""
    if method == "gradcos":
        return _unit_rows(q)
    return q if isinstance(precond, IdentityPreconditioner) else precond.apply(q)


def _prepare_keys(method: str, g: torch.Tensor) -> torch.Tensor:
    return _unit_rows(g) if method == "gradcos" else g


def score_arrays(Q: np.ndarray | torch.Tensor, G: np.ndarray | torch.Tensor, method: str = "graddot", *,
                 precision: str = "float32", **curvature_kw: Any) -> np.ndarray:
    """Scores ``[M, N]`` of one unit from in-memory features (``Q`` [M, k] test, ``G`` [N, k] train).

    ``method``: graddot | gradcos | if | datainf | lissa; ``curvature_kw`` go to ``fit_preconditioner``
    (``damping``, ``rank``, ...). Positive = the train sample helps.
    """
    if method not in ("graddot", "gradcos", "if", "datainf", "lissa"):
        raise ConfigError(f"score_arrays supports graddot, gradcos, if, datainf, lissa; got {method!r}")
    dt = _dtype(precision)
    q, g = torch.as_tensor(np.asarray(Q)).to(dt), torch.as_tensor(np.asarray(G)).to(dt)
    precond = fit_preconditioner(np.asarray(G), method=_CURVATURE[method], **curvature_kw)
    return (_prepare_queries(method, q, precond) @ _prepare_keys(method, g).T).numpy()


def _score_pairwise(plan: _Plan, writer: ScoreSetWriter, curvature: dict, block_bytes: int, bar: Any) -> None:
    """One GEMM per (unit, test block, train block): ``S = Σ_terms w · (Q H⁻¹) Gᵀ``, computed into one
    reused output buffer and written to the score set (``os.pwrite``) before the next block."""
    method, dt = plan.method, plan.dtype
    names = [u.name for u in plan.units]
    nb_max = max(_train_block_rows(plan.terms[0].train.feature_dim(n), plan.test_rows, len(plan.terms), block_bytes)
                 for n in names)
    buf = torch.empty(plan.test_rows * min(nb_max, plan.terms[0].train.n), dtype=dt)
    for ui, name in enumerate(names):
        k = plan.terms[0].train.feature_dim(name)
        pre = [fit_preconditioner(t.train, name, _CURVATURE[method], drop_nonfinite=plan.drop, **curvature)
               if _CURVATURE[method] != "identity" else IdentityPreconditioner(k, t.train.n)
               for t in plan.terms]
        nb = _train_block_rows(k, plan.test_rows, len(plan.terms), block_bytes)
        nb_alloc = min(nb, plan.terms[0].train.n)
        decode_bufs = [np.empty((nb_alloc, k), np.float32) for _ in plan.terms]  # reused for every block
        for r0, r1, keep_q in _test_blocks(plan):
            if not keep_q.any() or writer.is_done(ui, r0):   # done: recorded by an interrupted run
                continue
            qs = _block_queries(plan, pre, name, names, r0, r1, keep_q)
            streams = [t.train.iter_blocks(name, nb, out=dec) for t, dec in zip(plan.terms, decode_bufs)]
            for blocks in zip(*streams):
                n0, b = blocks[0][0], len(blocks[0][1])
                out = buf[:len(qs[0]) * b].view(len(qs[0]), b)                            # (m, b)
                for j, (q, (_, g), t) in enumerate(zip(qs, blocks, plan.terms)):
                    if not plan.drop and not np.isfinite(g).all():
                        _raise_nonfinite(t.train, names, "train")
                    gt = _prepare_keys(method, to_tensor(g).to(dt)).T                     # (k, b)
                    if j == 0:
                        torch.matmul(q, gt, out=out)
                    else:
                        out.addmm_(q, gt)
                keep = plan.keep_train[n0:n0 + b]
                writer.write(ui, plan.row_offset(r0), plan.col_offset(n0),
                             out.numpy() if keep.all() else out.numpy()[:, keep])
                bar.update(1)
            writer.mark_done(ui, r0)


def _block_queries(plan: _Plan, pre: list[Preconditioner], name: str, names: list[str], r0: int, r1: int,
                   keep_q: np.ndarray) -> list[torch.Tensor]:
    """The kept test rows ``r0:r1`` of unit ``name`` per term, as ``w · Q H⁻¹`` (non-finite rows raise)."""
    method, dt = plan.method, plan.dtype
    qs = []
    for t, p in zip(plan.terms, pre):
        _, q = next(t.test.iter_blocks(name, r1 - r0, start=r0, stop=r1))
        q = q[keep_q]
        if not plan.drop and not np.isfinite(q).all():
            _raise_nonfinite(t.test, names, "test")
        q = to_tensor(q).to(dt)                                                   # (m, k)
        qs.append(_prepare_queries(method, q, p).to(dt) * t.weight)
    return qs


def _score_selfinf(plan: _Plan, writer: ScoreSetWriter, curvature_method: str, curvature: dict,
                   block_bytes: int, bar: Any) -> None:
    """One row per unit: ``−g_iᵀ H⁻¹ g_i`` (float64 row sums)."""
    train = plan.terms[0].train
    for ui, unit in enumerate(plan.units):
        if writer.is_done(ui, 0):
            continue
        name = unit.name
        k = train.feature_dim(name)
        p = (fit_preconditioner(train, name, curvature_method, drop_nonfinite=True, **curvature)
             if curvature_method != "identity" else IdentityPreconditioner(k, train.n))
        for n0, g in train.iter_blocks(name, _train_block_rows(k, 1, 2, block_bytes)):
            g64 = to_tensor(g).to(torch.float64)
            s = -(p.apply(g64) * g64).sum(1).numpy()
            keep = plan.keep_train[n0:n0 + len(s)]
            writer.write(ui, 0, plan.col_offset(n0), s[keep][None, :])
            bar.update(1)
        writer.mark_done(ui, 0)


def _score_repsim(plan: _Plan, writer: ScoreSetWriter, reps_test: np.ndarray, reps_train: np.ndarray,
                  block_bytes: int, bar: Any) -> None:
    """Cosine of hidden representations, one pseudo-unit per representation index."""
    dt = plan.dtype
    nb = _train_block_rows(reps_train.shape[2], plan.test_rows, 1, block_bytes)
    for ui, unit in enumerate(plan.units):
        b = unit.block + 1                        # reps[:, 0] = embedding output (block -1)
        for r0, r1, keep_q in _test_blocks(plan):
            if writer.is_done(ui, r0):
                continue
            q = np.asarray(reps_test[r0:r1, b], np.float32)[keep_q]
            q = _unit_rows(to_tensor(q).to(dt))                                   # (m, d)
            for n0 in range(0, reps_train.shape[0], nb):
                g = _unit_rows(to_tensor(np.asarray(reps_train[n0:n0 + nb, b], np.float32)).to(dt))
                s = (q @ g.T).numpy()
                keep = plan.keep_train[n0:n0 + s.shape[1]]
                writer.write(ui, plan.row_offset(r0), plan.col_offset(n0), s[:, keep])
                bar.update(1)
            writer.mark_done(ui, r0)
