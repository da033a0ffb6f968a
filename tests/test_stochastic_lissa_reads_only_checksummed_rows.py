"""Stochastic LiSSA samples train rows at random; those reads go through the store's checksummed path, so a
corrupt chunk is named instead of silently entering the inverse-Hessian estimate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.errors import CorruptStoreError
from fastinf.scoring.curvature import fit_preconditioner
from fastinf.store import GradientStore


def _store(path):
    rng = np.random.default_rng(0)
    return GradientStore.from_arrays(path, {"u": rng.standard_normal((64, 6)).astype(np.float32)}, chunk_size=16)


def test_stochastic_lissa_on_a_store_equals_it_on_the_same_array(tmp_path):
    s = _store(tmp_path / "s")
    G = s.gather("u", np.arange(s.n))
    kw = dict(method="lissa", damping=0.1, lissa_depth=50, lissa_batch_rows=8, seed=3, cache=False)
    q = torch.randn(2, 6, dtype=torch.float64)
    a = fit_preconditioner(s, "u", **kw).apply(q)
    b = fit_preconditioner(G, **kw).apply(q)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_flipped_byte_in_a_sampled_chunk_is_named(tmp_path):
    s = _store(tmp_path / "s")
    f = next((tmp_path / "s" / "units").glob("*.npy"))
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF                       # inside the last chunk's rows
    f.write_bytes(bytes(raw))
    s = GradientStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=r"unit 'u' .*chunk 3 \(rows 48:64\) fails its checksum"):
        pre = fit_preconditioner(s, "u", method="lissa", damping=0.1, lissa_depth=50, lissa_batch_rows=64,
                                 seed=0, cache=False)
        pre.apply(torch.randn(1, 6, dtype=torch.float64))
