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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinf.scoring.curvature import (
    Damping,
    to_tensor,
    IdentityPreconditioner,
    Preconditioner,
    fit_preconditioner,
    nonfinite_error,
)
from fastinf.errors import ConfigError, StoreError, StoreMismatchError
from fastinf.scoring.scores import ScoreSet, ScoreSetWriter

__all__ = ["score", "score_arrays", "METHODS", "TokenRows", "token_rows", "tracin_we_arrays",
           "tracin_we_reference"]

log = logging.getLogger(__name__)

METHODS = ("graddot", "gradcos", "tracin", "if", "datainf", "lissa", "selfinf", "loss", "repsim", "tracin_we")
_CURVATURE = {"graddot": "identity", "gradcos": "identity", "tracin": "identity", "if": "if",
              "datainf": "datainf", "lissa": "lissa"}
DEFAULT_BLOCK_BYTES = 256 << 20
OUT_BLOCK_BYTES = 256 << 20  # cap of the [m, b] float32 output buffer
_MAX_TEST_BLOCK = 8192
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------
# array-level kernels (in-memory features; the building blocks of the blocked store path)
# ----------------------------------------------------------------------------------------------------
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


def _dtype(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ConfigError(f"precision must be 'float32' or 'float64'; got {precision!r}")
    return _DTYPES[precision]


# ----------------------------------------------------------------------------------------------------
# tracin_we: sparse embedding-gradient rows per sample
# ----------------------------------------------------------------------------------------------------
@dataclass
class TokenRows:
    """Per-sample embedding-gradient rows ``∇E_v = Σ_{t: id_t = v} g_t`` for the tokens v of each sample.

    Entries are sorted by (token, sample) so that all samples sharing a token are contiguous.
    """

    sample: np.ndarray   # [P] int64 sample index (relative to the block)
    token: np.ndarray    # [P] int64 vocabulary id
    rows: np.ndarray     # [P, d] summed output-gradient rows
    n: int               # number of samples in the block

    def groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique tokens and their [start, stop) slices."""
        uniq, start = np.unique(self.token, return_index=True)
        stop = np.append(start[1:], len(self.token))
        return uniq, start, stop


def token_rows(tokens: np.ndarray, grads: np.ndarray, *, topk: int | None = None,
               dtype: np.dtype = np.float32) -> TokenRows:
    """Sparse rows of ``tokens`` [B, L] (-1 = pad) and per-position gradients ``grads`` [B, L, d].

    ``topk``: keep, per sample, only the ``topk`` tokens whose summed row has the largest L2 norm
    (ties by token id).
    """
    tokens = np.asarray(tokens)
    grads = np.asarray(grads)
    if tokens.ndim != 2 or grads.ndim != 3 or grads.shape[:2] != tokens.shape:
        raise ConfigError(f"tracin_we needs tokens [N, L] and embed_grads [N, L, d] with matching N, L; got "
                          f"{tokens.shape} and {grads.shape}")
    B, _ = tokens.shape
    b_idx, t_idx = np.nonzero(tokens >= 0)
    tok = tokens[b_idx, t_idx].astype(np.int64)
    vocab = int(tok.max()) + 1 if len(tok) else 1
    key = b_idx.astype(np.int64) * vocab + tok
    uniq, inverse = np.unique(key, return_inverse=True)
    acc = torch.zeros(len(uniq), grads.shape[2], dtype=torch.float64)
    acc.index_add_(0, to_tensor(inverse.ravel()), to_tensor(
        np.asarray(grads[b_idx, t_idx], dtype=np.float64)))
    rows = acc.numpy()
    sample, token = uniq // vocab, uniq % vocab
    if topk is not None:
        if topk < 1:
            raise ConfigError(f"topk_tokens must be >= 1; got {topk}")
        norms = np.linalg.norm(rows, axis=1)
        order = np.lexsort((token, -norms, sample))                 # per sample: largest norm first
        s_sorted = sample[order]
        first = np.searchsorted(s_sorted, s_sorted, side="left")
        keep = order[(np.arange(len(order)) - first) < topk]
        sample, token, rows = sample[keep], token[keep], rows[keep]
    order = np.lexsort((sample, token))
    return TokenRows(sample[order], token[order], np.ascontiguousarray(rows[order], dtype=dtype), B)


def tracin_we_arrays(test: TokenRows, train: TokenRows) -> np.ndarray:
    """Scores [M, N] = Σ over common tokens of row dot products: one small GEMM per shared token."""
    out = np.zeros((test.n, train.n), dtype=np.result_type(test.rows, train.rows))
    ut, ts, te = test.groups()
    ur, rs, re_ = train.groups()
    common, it, ir = np.intersect1d(ut, ur, assume_unique=True, return_indices=True)
    for a, b in zip(it, ir):
        a0, a1, b0, b1 = ts[a], te[a], rs[b], re_[b]
        out[np.ix_(test.sample[a0:a1], train.sample[b0:b1])] += test.rows[a0:a1] @ train.rows[b0:b1].T
    return out


def tracin_we_reference(test_tokens: np.ndarray, test_grads: np.ndarray, train_tokens: np.ndarray,
                        train_grads: np.ndarray, *, topk: int | None = None, topk_side: str = "test") -> np.ndarray:
    """The literal TracIn-WE definition in float64 (slow; tests): for each pair, sum ⟨row_v, row'_v⟩
    over the vocabulary ids v present in both texts, rows built token by token."""

    def rows_of(ids: np.ndarray, g: np.ndarray, k: int | None) -> dict[int, np.ndarray]:
        rows: dict[int, np.ndarray] = {}
        for t, v in enumerate(ids):
            if v >= 0:
                rows[int(v)] = rows.get(int(v), 0.0) + np.asarray(g[t], np.float64)
        if k is not None:
            ranked = sorted(rows, key=lambda v: (-np.linalg.norm(rows[v]), v))[:k]
            rows = {v: rows[v] for v in ranked}
        return rows

    k_test = topk if topk_side in ("test", "both") else None
    k_train = topk if topk_side in ("train", "both") else None
    A = [rows_of(test_tokens[m], test_grads[m], k_test) for m in range(len(test_tokens))]
    B = [rows_of(train_tokens[n], train_grads[n], k_train) for n in range(len(train_tokens))]
    out = np.zeros((len(A), len(B)))
    for m, ra in enumerate(A):
        for n, rb in enumerate(B):
            out[m, n] = sum(float(ra[v] @ rb[v]) for v in set(ra) & set(rb))
    return out


# ----------------------------------------------------------------------------------------------------
# the blocked store path
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Term:
    """One (test store, train store, weight) triple; tracin sums several, other methods have one."""

    test: Any
    train: Any
    weight: float = 1.0


@dataclass
class _Plan:
    method: str
    units: list             # Unit objects to score
    terms: list[_Term]
    keep_test: np.ndarray    # bool [M]
    keep_train: np.ndarray   # bool [N]
    test_rows: int           # rows per test block
    dtype: torch.dtype
    drop: bool = False       # drop_nonfinite: masks are exact; otherwise blocks are checked as they stream

    def col_offset(self, n0: int) -> int:
        """Output column of train row ``n0`` (dropped rows before it are left out)."""
        return int(self._col_prefix[n0])

    def row_offset(self, m0: int) -> int:
        """Output row of test row ``m0``."""
        return int(self._row_prefix[m0])

    def __post_init__(self) -> None:
        self._col_prefix = np.concatenate([[0], np.cumsum(self.keep_train)])
        self._row_prefix = np.concatenate([[0], np.cumsum(self.keep_test)])


def _train_block_rows(k: int, m_rows: int, terms: int, budget: int) -> int:
    """Train rows per block: the output buffer [m, b] + train features [b, k] per term (float32, plus a
    decode copy), within ``budget``; the output buffer is also capped at ``OUT_BLOCK_BYTES``: larger
    blocks save per-row write calls, but a fresh buffer costs first-touch page faults."""
    per_row = 4 * (m_rows + 2 * k * terms)
    rows = min(budget // max(per_row, 1), OUT_BLOCK_BYTES // (4 * max(m_rows, 1)))
    return int(max(64, min(1 << 22, rows)))


def _test_block_rows(k: int, M: int, budget: int) -> int:
    return int(max(1, min(M, _MAX_TEST_BLOCK, budget // (4 * 4 * max(k, 1)))))


def _finite_rows(store: Any, names: Sequence[str], block_rows: int = 65536) -> np.ndarray:
    """Bool [N]: the rows whose features are finite in every unit of ``names``."""
    keep = np.ones(store.n, dtype=bool)
    for name in names:
        for start, block in store.iter_blocks(name, block_rows):
            keep[start:start + len(block)] &= np.isfinite(block).all(axis=1)
    return keep


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


def _raise_nonfinite(store: Any, names: Sequence[str], side: str) -> None:
    """Called when a streamed block holds NaN/inf: scan the store and name every offending sample."""
    ok = _finite_rows(store, names)
    raise nonfinite_error(f"the {side} store {store.path}", np.asarray(store.meta.ids)[~ok])


def _sources(terms: list[_Term]) -> dict:
    """Provenance: the stores (paths and fingerprints) and weights the scores come from."""
    return {"checkpoints": [{"test": None if t.test is None else str(t.test.path), "train": str(t.train.path),
                             "weight": t.weight, "train_fingerprint": t.train.fingerprint,
                             "test_fingerprint": None if t.test is None else t.test.fingerprint}
                            for t in terms]}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="block", dynamic_ncols=True)


def _test_blocks(plan: _Plan) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(row0, row1, keep)`` over the test store's rows, with ``keep`` the finite-row mask of the block."""
    M = len(plan.keep_test)
    for r0 in range(0, M, plan.test_rows):
        r1 = min(M, r0 + plan.test_rows)
        yield r0, r1, plan.keep_test[r0:r1]


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
            if not keep_q.any():
                continue
            qs = []
            for t, p in zip(plan.terms, pre):
                _, q = next(t.test.iter_blocks(name, r1 - r0, start=r0, stop=r1))
                q = q[keep_q]
                if not plan.drop and not np.isfinite(q).all():
                    _raise_nonfinite(t.test, names, "test")
                q = to_tensor(q).to(dt)                                                   # (m, k)
                qs.append(_prepare_queries(method, q, p).to(dt) * t.weight)
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


def _score_selfinf(plan: _Plan, writer: ScoreSetWriter, curvature_method: str, curvature: dict,
                   block_bytes: int, bar: Any) -> None:
    """One row per unit: ``−g_iᵀ H⁻¹ g_i`` (float64 row sums)."""
    train = plan.terms[0].train
    for ui, unit in enumerate(plan.units):
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


def _score_repsim(plan: _Plan, writer: ScoreSetWriter, reps_test: np.ndarray, reps_train: np.ndarray,
                  block_bytes: int, bar: Any) -> None:
    """Cosine of hidden representations, one pseudo-unit per representation index."""
    dt = plan.dtype
    nb = _train_block_rows(reps_train.shape[2], plan.test_rows, 1, block_bytes)
    for ui, unit in enumerate(plan.units):
        b = unit.block + 1                        # reps[:, 0] = embedding output (block -1)
        for r0, r1, keep_q in _test_blocks(plan):
            q = np.asarray(reps_test[r0:r1, b], np.float32)[keep_q]
            q = _unit_rows(to_tensor(q).to(dt))                                   # (m, d)
            for n0 in range(0, reps_train.shape[0], nb):
                g = _unit_rows(to_tensor(np.asarray(reps_train[n0:n0 + nb, b], np.float32)).to(dt))
                s = (q @ g.T).numpy()
                keep = plan.keep_train[n0:n0 + s.shape[1]]
                writer.write(ui, plan.row_offset(r0), plan.col_offset(n0), s[:, keep])
                bar.update(1)


def _score_tracin_we(plan: _Plan, writer: ScoreSetWriter, test: Any, train: Any, topk: int | None,
                     topk_side: str, block_bytes: int, bar: Any) -> None:
    np_dt = np.float64 if plan.dtype == torch.float64 else np.float32
    tok_q, grad_q = test.extra("tokens"), test.extra("embed_grads")
    tok_g, grad_g = train.extra("tokens"), train.extra("embed_grads")
    k_test = topk if topk_side in ("test", "both") else None
    k_train = topk if topk_side in ("train", "both") else None
    nb = _we_block_rows(grad_g.shape, plan.test_rows, block_bytes)
    for r0, r1, keep_q in _test_blocks(plan):
        A = token_rows(np.asarray(tok_q[r0:r1])[keep_q], np.asarray(grad_q[r0:r1])[keep_q], topk=k_test, dtype=np_dt)
        for n0 in range(0, train.n, nb):
            B = token_rows(tok_g[n0:n0 + nb], grad_g[n0:n0 + nb], topk=k_train, dtype=np_dt)
            s = tracin_we_arrays(A, B)
            keep = plan.keep_train[n0:n0 + s.shape[1]]
            writer.write(0, plan.row_offset(r0), plan.col_offset(n0), s[:, keep])
            bar.update(1)


def _we_block_rows(grad_shape: tuple, test_rows: int, block_bytes: int) -> int:
    """Train samples per tracin_we block: float64 token rows [b·L, d] plus the output [m, b]."""
    _, L, d = grad_shape
    return int(max(16, block_bytes // max(1, 8 * L * d + 8 * test_rows)))


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


def score(test_store: Any, train_store: Any, method: str = "graddot", layers: Any = None, *,
          out: str | Path | None = None, overwrite: bool = False, damping: Damping | float | str | None = None,
          rank: int | None = None, curvature: str | None = None,
          checkpoints: Sequence[tuple[Any, Any, float]] | None = None, topk_tokens: int | None = None,
          topk_side: str = "test", drop_nonfinite: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
          precision: str = "float32", progress: bool = False, curvature_options: dict | None = None) -> ScoreSet:
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
        damping: λ for if / lissa / datainf / selfinf: absolute (``1e-3``) or ``"rel:0.1"``
            (0.1 × mean eigenvalue of GᵀG/N). Defaults: rel:0.1 (DataInf: its closed form, the same).
        rank: ``if`` only: top-r eigenpairs + damping (Woodbury) instead of the exact inverse.
        curvature: ``selfinf`` only: ``if`` (default), ``datainf``, ``lissa`` or ``identity``.
        checkpoints: ``tracin``: ``[(test_store_c, train_store_c, lr_c), ...]``; scores ``Σ_c lr_c Q_c G_cᵀ``.
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
    dt = _dtype(precision)
    curv = dict(curvature_options or {})
    if damping is not None:
        curv["damping"] = Damping.parse(damping)
    if rank is not None:
        curv["rank"] = rank
    terms = _make_terms(method, _open(test_store), _open(train_store), checkpoints)
    test, train = terms[-1].test, terms[-1].train
    setup = _SETUPS.get(method, _setup_pairwise)(method, terms, layers, drop_nonfinite)
    keep_test, keep_train = setup.keep_test, setup.keep_train
    if not keep_train.any() or not keep_test.any():
        raise StoreError("no test or no train sample is left after dropping samples with NaN/inf values")
    k_max = max((train.feature_dim(u.name) for u in setup.units if u.name in train.unit_names), default=1)
    plan = _Plan(method, setup.units, terms, keep_test, keep_train,
                 _test_block_rows(k_max, len(keep_test), block_bytes), dt, drop=drop_nonfinite)

    log.info("score %s: %d unit(s), %d test x %d train rows kept, test blocks of %d rows, precision %s",
             method, len(setup.units), int(keep_test.sum()), int(keep_train.sum()), plan.test_rows, precision)
    one_row = method in ("selfinf", "loss")
    params = {"method": method, "layers": layers if layers is None or isinstance(layers, str) else list(layers),
              "damping": None if damping is None else Damping.parse(damping).describe(), "rank": rank,
              "curvature": curvature, "topk_tokens": topk_tokens, "topk_side": topk_side,
              "drop_nonfinite": drop_nonfinite, "precision": precision, "block_bytes": block_bytes,
              "dropped_test_ids": [] if one_row else np.asarray(test.meta.ids)[~keep_test].tolist(),
              "dropped_train_ids": np.asarray(train.meta.ids)[~keep_train].tolist()}
    tmp = out is None
    root = Path(tempfile.mkdtemp(prefix="fastinf-scores-")) if tmp else Path(out)
    writer = ScoreSetWriter(
        root, method=method, units=setup.units, train_ids=np.asarray(train.meta.ids)[keep_train],
        test_ids=np.array([-1]) if one_row else np.asarray(test.meta.ids)[keep_test],
        test_correct=None if one_row else np.asarray(test.meta.correct, bool)[keep_test],
        params=params, sources=_sources(terms), overwrite=overwrite or tmp)
    try:
        with _progress(_n_steps(plan, train, block_bytes), progress, f"score {method}") as bar:
            if method == "loss":
                writer.write(0, 0, 0, (-setup.loss[keep_train]).astype(np.float32)[None, :])
                bar.update(1)
            elif method == "selfinf":
                _score_selfinf(plan, writer, curvature or "if", curv, block_bytes, bar)
            elif method == "repsim":
                _score_repsim(plan, writer, test.extra("reps"), train.extra("reps"), block_bytes, bar)
            elif method == "tracin_we":
                _score_tracin_we(plan, writer, test, train, topk_tokens, topk_side, block_bytes, bar)
            else:
                _score_pairwise(plan, writer, curv, block_bytes, bar)
        result = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    if tmp:
        weakref.finalize(result, shutil.rmtree, str(root), True)
    return result


def _open(store: Any) -> Any:
    """A GradientStore from a store object, a path, or None."""
    if isinstance(store, (str, Path)):
        from fastinf.store.gradient_store import GradientStore

        return GradientStore.open(store)
    return store


def _check_arguments(method: str, *, damping: Any, rank: int | None, curvature: str | None,
                     topk_tokens: int | None, topk_side: str, checkpoints: Any, block_bytes: int) -> None:
    """Refuse option combinations that do not apply to ``method`` (before any work or output)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if damping is not None:
        Damping.parse(damping)
        if method not in ("if", "datainf", "lissa", "selfinf"):
            raise ConfigError(f"damping= applies to if, datainf, lissa and selfinf; {method!r} uses no curvature")
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
    """The (test, train, weight) triples: one, or one per tracin checkpoint."""
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


_SETUPS = {"selfinf": _setup_selfinf, "loss": _setup_loss, "repsim": _setup_repsim, "tracin_we": _setup_tracin_we}


def _refuse_nonfinite(test: Any, keep_test: np.ndarray, train: Any, keep_train: np.ndarray, drop: bool,
                      what: str) -> None:
    if drop:
        return
    for store, keep, side in ((test, keep_test, "test"), (train, keep_train, "train")):
        if not keep.all():
            raise nonfinite_error(f"the {what} of the {side} store {store.path}", np.asarray(store.meta.ids)[~keep])


def _n_blocks_of(store: Any) -> int:
    from fastinf.extraction.units import n_blocks

    return n_blocks(store.units)


def _pseudo_unit(name: str, kind: str, block: int, role: str, d_out: int, d_in: int = 1) -> Any:
    """A Unit for scores that do not come from one weight matrix (baselines, representations)."""
    from fastinf.extraction.units import Unit

    return Unit(name=name, kind=kind, block=block, role=role, d_out=max(1, d_out), d_in=max(1, d_in), bias=False)


def _n_steps(plan: _Plan, train: Any, block_bytes: int) -> int:
    """Number of progress-bar steps (blocks) the plan will run."""
    test_blocks = -(-len(plan.keep_test) // plan.test_rows)
    if plan.method == "loss":
        return 1
    if plan.method == "tracin_we":
        return test_blocks * -(-train.n // _we_block_rows(train.extra("embed_grads").shape, plan.test_rows,
                                                          block_bytes))
    if plan.method == "repsim":
        nb = _train_block_rows(train.extra("reps").shape[2], plan.test_rows, 1, block_bytes)
        return len(plan.units) * test_blocks * -(-train.n // nb)
    total = 0
    for u in plan.units:
        k = train.feature_dim(u.name)
        if plan.method == "selfinf":
            total += -(-train.n // _train_block_rows(k, 1, 2, block_bytes))
        else:
            total += test_blocks * -(-train.n // _train_block_rows(k, plan.test_rows, len(plan.terms), block_bytes))
    return total
