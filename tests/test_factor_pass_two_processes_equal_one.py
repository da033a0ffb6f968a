"""Invariant: the factor pass run by two real processes (torch.distributed gloo, ``torch.multiprocessing.spawn``)
gives the factors of one process: the same identity, token and sample counts, and A, S and eigenvalues equal to
float64 rounding (the ranks' float64 chunk sums are added in rank order instead of chunk order), with every rank
returning the finished factor set and no rank state left behind."""
from __future__ import annotations

import numpy as np
import pytest

from fastinf.extraction.factors_format import Factors

KW = dict(layers="all", batch_size=4, chunk_size=5, max_length=12, progress=False)


def _load(model_dir: str, data: str):
    from fastinf.data.datasets import load_dataset_spec
    from fastinf.extraction.models import load_model
    from tests._models import NUM_LABELS

    model, tok = load_model(model_dir, task="seq-cls", num_labels=NUM_LABELS)
    return model, tok, load_dataset_spec(data)


def _worker(rank: int, world: int, init_file: str, model_dir: str, data: str, out: str) -> None:
    """One rank: join the gloo group, run the pass, check it returns the finished set."""
    import torch
    import torch.distributed as dist

    from fastinf.extraction.factors import fit_factors

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok, ds = _load(model_dir, data)
        f = fit_factors(model, tok, ds, out, **KW)
        assert f is not None and f.fingerprint == Factors.open(out).fingerprint, f"rank {rank}: no factor set"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_factors_of_one(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from fastinf.extraction.factors import fit_factors
    from tests.scripts.assets import make_assets

    assets = make_assets(tmp_path / "assets", n_train=23, n_test=3)   # 5 chunks: 0, 2, 4 on rank 0; 1, 3 on 1
    model_dir, data = str(assets["model"]), str(assets["train"])
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), model_dir, data, str(tmp_path / "two")), nprocs=2,
             join=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, ds = _load(model_dir, data)
        one = fit_factors(model, tok, ds, tmp_path / "one", **KW)
    finally:
        torch.set_num_threads(before)
    two = Factors.open(tmp_path / "two")
    assert two.identity == one.identity and not (tmp_path / "two" / "state").exists()
    assert one.unit_names == two.unit_names and len(one.unit_names) > 4
    for name in one.unit_names:
        u1, u2 = one.unit(name), two.unit(name)
        assert (u1.tokens, u1.samples) == (u2.tokens, u2.samples), name
        for a, b in ((u1.S, u2.S), (u1.s_evals, u2.s_evals), (u1.A, u2.A), (u1.a_diag, u2.a_diag),
                     (u1.a_evals, u2.a_evals)):
            if a is None:
                assert b is None, name
                continue
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * max(1.0, float(np.abs(a).max())), err_msg=name)
