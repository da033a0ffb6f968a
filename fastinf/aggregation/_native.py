"""Rank/vote accumulation over score blocks: the compiled ``fastinf._C`` path and its numpy reference.

One function, two implementations with identical results (bit for bit, for any thread count):

- :func:`accumulate_ranks_numpy` - the reference: ``argsort`` per row, tie groups found by comparing
  neighbours, outputs accumulated row by row. Obvious, and ~10x slower.
- ``fastinf._C.accumulate_ranks`` - C++17 (csrc/aggregate.cpp): radix sort per row, partial radix
  *selection* when only votes are needed, rows and then train columns split over ``std::thread``s with
  the GIL released.

:func:`accumulate_ranks` dispatches between them. The backend is decided once at import: the compiled
path when ``fastinf._C`` provides it, else numpy (logged). ``FASTINF_AGGREGATE_BACKEND=numpy|cpp``
overrides the choice, and every call accepts ``backend=`` (tests use it to compare the two).
``FASTINF_NUM_THREADS`` caps the C++ threads (default: the CPUs this process may use).

Ranks are 0-based and ascending (rank 0 = lowest score = most detrimental); ties get the average
rank. Everything is kept in integers by using the *doubled* average rank ``r2 = lo + hi``, with
``[lo, hi]`` the sorted positions of the tie group. The outputs (each optional, updated in place):

=============  =========  =========================================================
``rank_sum2``  int64 [N]  ``+= r2``
``vote_sum2``  int64 [N]  ``+= max(0, 2K - r2)``   (twice the Vote ``max(0, K - rank)``)
``min_rank2``  int64 [N]  ``= min(min_rank2, r2)``
``rrf_sum``    f64 [N]    ``+= 2 / (2k + 2 + r2)``  (= 1 / (k + rank + 1), rows added in order)
=============  =========  =========================================================
"""
from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np

from fastinf.errors import BackendError, ConfigError, NonFiniteError

logger = logging.getLogger(__name__)

Backend = Literal["cpp", "numpy"]
_BACKENDS = ("cpp", "numpy")

try:  # the compiled extension is optional at import time; its absence is reported on use
    from fastinf import _C  # type: ignore[attr-defined]

    _HAVE_CPP = hasattr(_C, "accumulate_ranks")
except ImportError:  # pragma: no cover - depends on the build
    _C = None
    _HAVE_CPP = False


def _default_backend() -> Backend:
    forced = os.environ.get("FASTINF_AGGREGATE_BACKEND", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ConfigError(f"FASTINF_AGGREGATE_BACKEND: expected one of {_BACKENDS}, found {forced!r}")
        return forced  # type: ignore[return-value]
    if not _HAVE_CPP:
        logger.info("fastinf._C.accumulate_ranks not available; rank/vote aggregation uses numpy")
        return "numpy"
    return "cpp"


DEFAULT_BACKEND: Backend = _default_backend()


def default_threads() -> int:
    """Threads for the C++ path: ``FASTINF_NUM_THREADS`` or the CPUs available to this process."""
    env = os.environ.get("FASTINF_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError as e:
            raise ConfigError(f"FASTINF_NUM_THREADS: expected a positive integer, found {env!r}") from e
        if n < 1:
            raise ConfigError(f"FASTINF_NUM_THREADS: expected a positive integer, found {n}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def resolve_backend(backend: str | None) -> Backend:
    """Returns the backend to use; raises if ``cpp`` is requested but not built."""
    chosen = DEFAULT_BACKEND if backend is None else backend
    if chosen not in _BACKENDS:
        raise ConfigError(f"backend: expected one of {_BACKENDS} or None, found {chosen!r}")
    if chosen == "cpp" and not _HAVE_CPP:
        raise BackendError(
            "backend 'cpp' requested but fastinf._C.accumulate_ranks is missing; rebuild the extension with "
            "`pip install --no-build-isolation -e .` (needs a C++17 compiler) or use backend='numpy'"
        )
    return chosen  # type: ignore[return-value]


def doubled_ranks(block: np.ndarray) -> np.ndarray:
    """Doubled average ranks ``r2 = lo + hi`` of each row of ``block`` [R, N]; int64 [R, N].

    The numpy reference of the ranking step. Rows are ranked as float32 (like the C++ path); -0.0 and
    +0.0 compare equal and so share a tie group.
    """
    block = np.asarray(block, dtype=np.float32)
    if block.ndim != 2:
        raise ConfigError(f"block: expected a 2-D (rankers, train) array, found shape {block.shape}")
    rows, n = block.shape
    if rows == 0:
        return np.zeros((0, n), dtype=np.int64)
    if np.isnan(block).any():
        raise NonFiniteError(f"scores: NaN in a block of {rows} rankers; remove or fix the NaN scores first")
    order = np.argsort(block, axis=1, kind="stable")  # (R, N)
    srt = np.take_along_axis(block, order, axis=1)  # (R, N) ascending
    starts = np.ones((rows, n), dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    pos = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n))
    # lo: position of the group's first element (running max of start positions);
    # hi: position of the group's last element (running min, from the right, of end positions).
    lo = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    ends = np.ones((rows, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    hi = np.minimum.accumulate(np.where(ends, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    r2 = np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(r2, order, lo + hi, axis=1)
    return r2


def accumulate_ranks_numpy(
    block: np.ndarray,
    *,
    vote_k: int = 0,
    rank_sum2: np.ndarray | None = None,
    vote_sum2: np.ndarray | None = None,
    min_rank2: np.ndarray | None = None,
    rrf_sum: np.ndarray | None = None,
    rrf_k: int = 60,
) -> None:
    """Numpy reference of :func:`accumulate_ranks` (same arguments, same results bit for bit)."""
    r2 = doubled_ranks(block)  # (R, N)
    if rank_sum2 is not None:
        rank_sum2 += r2.sum(axis=0)
    if vote_sum2 is not None:
        vote_sum2 += np.maximum(0, 2 * vote_k - r2).sum(axis=0)
    if min_rank2 is not None and r2.shape[0]:
        np.minimum(min_rank2, r2.min(axis=0), out=min_rank2)
    if rrf_sum is not None:
        denom_base = float(2 * rrf_k + 2)
        for row in r2:  # row order, as the C++ path adds them
            rrf_sum += 2.0 / (denom_base + row.astype(np.float64))


def _check_out(name: str, arr: np.ndarray | None, n: int, dtype: type) -> None:
    if arr is None:
        return
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (n,) or not arr.flags.c_contiguous:
        found = f"{type(arr).__name__} {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}"
        raise ConfigError(f"{name}: expected a C-contiguous {np.dtype(dtype)} array of shape ({n},), found {found}")
    if not arr.flags.writeable:
        raise ConfigError(f"{name}: expected a writeable array, found a read-only one")


def accumulate_ranks(
    block: np.ndarray,
    *,
    vote_k: int = 0,
    rank_sum2: np.ndarray | None = None,
    vote_sum2: np.ndarray | None = None,
    min_rank2: np.ndarray | None = None,
    rrf_sum: np.ndarray | None = None,
    rrf_k: int = 60,
    backend: str | None = None,
    n_threads: int | None = None,
) -> None:
    """Ranks each row (ranker) of ``block`` [R, N] ascending and accumulates into the given outputs.

    See the module docstring for what each output receives. ``vote_k`` is K of the Vote aggregation
    (``1 <= K <= N``, needed when ``vote_sum2`` is given). When only ``vote_sum2`` is requested the C++
    path uses partial selection (O(N) per row instead of a full sort). Raises
    :class:`~fastinf.errors.NonFiniteError` on NaN scores, leaving the outputs untouched.
    """
    block = np.asarray(block)
    if block.ndim != 2:
        raise ConfigError(f"block: expected a 2-D (rankers, train) array, found shape {block.shape}")
    n = block.shape[1]
    _check_out("rank_sum2", rank_sum2, n, np.int64)
    _check_out("vote_sum2", vote_sum2, n, np.int64)
    _check_out("min_rank2", min_rank2, n, np.int64)
    _check_out("rrf_sum", rrf_sum, n, np.float64)
    if vote_sum2 is not None and not 1 <= vote_k <= n:
        raise ConfigError(f"vote_k: expected 1 <= K <= N = {n}, found {vote_k}")
    if rrf_k < 0:
        raise ConfigError(f"rrf_k: expected a non-negative integer, found {rrf_k}")
    if resolve_backend(backend) == "numpy":
        accumulate_ranks_numpy(block, vote_k=vote_k, rank_sum2=rank_sum2, vote_sum2=vote_sum2,
                               min_rank2=min_rank2, rrf_sum=rrf_sum, rrf_k=rrf_k)
        return
    scores = np.ascontiguousarray(block, dtype=np.float32)
    try:
        _C.accumulate_ranks(scores, int(vote_k), rank_sum2, vote_sum2, min_rank2, rrf_sum, int(rrf_k),
                            int(n_threads or default_threads()))
    except ValueError as e:
        if "NaN" in str(e):
            raise NonFiniteError(f"{e}; remove or fix the NaN scores first") from e
        raise
