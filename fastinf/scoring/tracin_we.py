"""TracIn-WE (Yeh et al.): influence through the embedding gradients of the tokens two texts share.

``token_rows`` turns per-position embedding gradients into sparse per-sample rows ``∇E_v`` (one per
vocabulary id v of the sample, optionally only the top-k by norm); ``tracin_we_arrays`` scores two sets
of rows (one small GEMM per shared token); ``tracin_we_reference`` is the literal definition (tests);
``_score_tracin_we`` is the blocked store path that ``score(method="tracin_we")`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError
from fastinf.scoring.planning import _Plan, _test_blocks, _we_block_rows
from fastinf.scoring.scores import ScoreSetWriter
from fastinf.scoring.sources import to_tensor

__all__ = ["TokenRows", "token_rows", "tracin_we_arrays", "tracin_we_reference"]


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


def _score_tracin_we(plan: _Plan, writer: ScoreSetWriter, test: Any, train: Any, topk: int | None,
                     topk_side: str, block_bytes: int, bar: Any) -> None:
    np_dt = np.float64 if plan.dtype == torch.float64 else np.float32
    tok_q, grad_q = test.extra("tokens"), test.extra("embed_grads")
    tok_g, grad_g = train.extra("tokens"), train.extra("embed_grads")
    k_test = topk if topk_side in ("test", "both") else None
    k_train = topk if topk_side in ("train", "both") else None
    nb = _we_block_rows(grad_g.shape, plan.test_rows, block_bytes)
    for r0, r1, keep_q in _test_blocks(plan):
        if writer.is_done(0, r0):   # recorded by an interrupted run
            continue
        A = token_rows(np.asarray(tok_q[r0:r1])[keep_q], np.asarray(grad_q[r0:r1])[keep_q], topk=k_test, dtype=np_dt)
        for n0 in range(0, train.n, nb):
            B = token_rows(tok_g[n0:n0 + nb], grad_g[n0:n0 + nb], topk=k_train, dtype=np_dt)
            s = tracin_we_arrays(A, B)
            keep = plan.keep_train[n0:n0 + s.shape[1]]
            writer.write(0, plan.row_offset(r0), plan.col_offset(n0), s[:, keep])
            bar.update(1)
        writer.mark_done(0, r0)
