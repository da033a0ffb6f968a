"""Invariant: the C++ rank/vote accumulation (fastinf._C) equals the numpy reference bit for bit, and
the reference's doubled ranks equal a literal O(N^2) definition, for any thread count, ties, signed
zeros and skewed value distributions (which exercise the radix-selection fallbacks)."""
import numpy as np
import pytest

from fastinf import _C
from fastinf.aggregation import _native
from fastinf.errors import ConfigError, NonFiniteError


def literal_doubled_ranks(row):
    """2 * average rank: #(smaller) * 2 + #(equal) - 1, by counting."""
    out = []
    for x in row:
        less = sum(1 for y in row if y < x)
        equal = sum(1 for y in row if y == x)
        out.append(2 * less + equal - 1)
    return np.array(out, dtype=np.int64)


def _blocks(rng):
    """Awkward shapes and value distributions."""
    yield rng.standard_normal((3, 1)).astype(np.float32)  # N = 1
    yield rng.standard_normal((1, 7)).astype(np.float32)
    yield rng.standard_normal((5, 1031)).astype(np.float32)
    yield rng.integers(-3, 4, (6, 997)).astype(np.float32)  # heavy ties
    yield np.zeros((2, 300), np.float32)  # one tie group
    z = rng.standard_normal((4, 500)).astype(np.float32)
    z[:, ::3] = 0.0
    z[:, 1::3] = -0.0  # -0.0 and +0.0 tie
    yield z
    yield (1.0 + 1e-4 * rng.random((4, 5003))).astype(np.float32)  # one top-level radix bucket
    yield np.concatenate([np.full((3, 4000), 2.5, np.float32),
                          rng.standard_normal((3, 100)).astype(np.float32)], axis=1)  # big tie at the cut
    big = rng.standard_normal((3, 2000)).astype(np.float32) * np.float32(1e30)
    big[:, :5] = np.array([np.inf, -np.inf, 1e-38, -1e-38, np.float32(3.4e38)], np.float32)
    yield big


def _run(block, k, backend, threads, only_vote=False):
    n = block.shape[1]
    out = {"vote_sum2": np.zeros(n, np.int64)}
    if not only_vote:
        out.update(rank_sum2=np.zeros(n, np.int64), min_rank2=np.full(n, 2**62, np.int64),
                   rrf_sum=np.zeros(n, np.float64))
    _native.accumulate_ranks(block, vote_k=k, backend=backend, n_threads=threads, rrf_k=7, **out)
    return out


def test_doubled_ranks_match_literal_definition():
    rng = np.random.default_rng(1)
    for block in _blocks(rng):
        if block.shape[1] > 1100:
            block = block[:, :300]
        got = _native.doubled_ranks(block)
        for r in range(block.shape[0]):
            np.testing.assert_array_equal(got[r], literal_doubled_ranks(block[r].tolist()))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_cpp_equals_numpy_exactly(threads):
    rng = np.random.default_rng(threads)
    for block in _blocks(rng):
        n = block.shape[1]
        for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
            ref = _run(block, k, "numpy", threads)
            got = _run(block, k, "cpp", threads)
            for name in ref:
                assert np.array_equal(ref[name], got[name]), (
                    f"{name} differs (N={n}, K={k}, threads={threads}): "
                    f"{int((ref[name] != got[name]).sum())} of {n} entries")
            # vote-only calls take the partial-selection path; it must agree with the full sort
            part = _run(block, k, "cpp", threads, only_vote=True)
            assert np.array_equal(part["vote_sum2"], ref["vote_sum2"]), f"partial vote differs (N={n}, K={k})"
            shared = np.zeros(n, np.int64)  # the same selection through the shared-buffer path
            _C.accumulate_ranks(np.ascontiguousarray(block, np.float32), k, None, shared, None, None, 0, threads, 0)
            assert np.array_equal(shared, ref["vote_sum2"]), f"shared-buffer vote differs (N={n}, K={k})"


def test_accumulation_adds_to_existing_outputs():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 333)).astype(np.float32)
    for backend in ("numpy", "cpp"):
        once = np.zeros(333, np.int64)
        _native.accumulate_ranks(np.concatenate([a, b]), rank_sum2=once, backend=backend)
        twice = np.zeros(333, np.int64)
        _native.accumulate_ranks(a, rank_sum2=twice, backend=backend)
        _native.accumulate_ranks(b, rank_sum2=twice, backend=backend)
        assert np.array_equal(once, twice)


def test_nan_raises_and_leaves_outputs_untouched():
    block = np.ones((3, 50), np.float32)
    block[2, 7] = np.nan
    for backend in ("numpy", "cpp"):
        out = np.full(50, 5, np.int64)
        with pytest.raises(NonFiniteError, match="NaN"):
            _native.accumulate_ranks(block, rank_sum2=out, backend=backend)
        assert (out == 5).all()
        with pytest.raises(NonFiniteError):
            _native.accumulate_ranks(block, vote_k=3, vote_sum2=out, backend=backend)


def test_bad_arguments_are_rejected():
    block = np.zeros((2, 10), np.float32)
    with pytest.raises(ConfigError, match="vote_k"):
        _native.accumulate_ranks(block, vote_k=11, vote_sum2=np.zeros(10, np.int64))
    with pytest.raises(ConfigError, match="int64"):
        _native.accumulate_ranks(block, rank_sum2=np.zeros(10, np.float64))
    with pytest.raises(ConfigError, match="shape"):
        _native.accumulate_ranks(block, rank_sum2=np.zeros(9, np.int64))
    with pytest.raises(ConfigError, match="backend"):
        _native.accumulate_ranks(block, rank_sum2=np.zeros(10, np.int64), backend="gpu")
