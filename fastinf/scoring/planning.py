"""Planning the blocked store path: what ``score()`` will compute and in blocks of which size.

``_Term`` is one (test store, train store, weight) triple, ``_Plan`` the units, kept rows, test block
size and dtype of one scoring run; the ``*_block_rows`` functions size test and train blocks from the
memory budget ``block_bytes``, and ``_n_steps`` counts the blocks (the progress bar).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastinf.errors import ConfigError

DEFAULT_BLOCK_BYTES = 256 << 20
OUT_BLOCK_BYTES = 256 << 20  # cap of the [m, b] float32 output buffer
_MAX_TEST_BLOCK = 8192
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ConfigError(f"precision must be 'float32' or 'float64'; got {precision!r}")
    return _DTYPES[precision]


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


def _we_block_rows(grad_shape: tuple, test_rows: int, block_bytes: int) -> int:
    """Train samples per tracin_we block: float64 token rows [b·L, d] plus the output [m, b]."""
    _, L, d = grad_shape
    return int(max(16, block_bytes // max(1, 8 * L * d + 8 * test_rows)))


def _test_blocks(plan: _Plan) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(row0, row1, keep)`` over the test store's rows, with ``keep`` the finite-row mask of the block."""
    M = len(plan.keep_test)
    for r0 in range(0, M, plan.test_rows):
        r1 = min(M, r0 + plan.test_rows)
        yield r0, r1, plan.keep_test[r0:r1]


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
