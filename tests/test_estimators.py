"""Every estimator against a float64 brute force on a tiny random model (explicit per-sample gradients,
explicit H, explicit inverse), through the full store -> score -> ScoreSet path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinf.scoring.curvature import datainf_reference
from fastinf.scoring.estimators import score, score_arrays, token_rows, tracin_we_arrays, tracin_we_reference
from fastinf.store import GradientStore
from fastinf.extraction.units import Unit

D_IN, HID, C = 5, 4, 3
UNITS = [Unit("l1", "linear", 0, "mlp.up", HID, D_IN, bias=True), Unit("l2", "head", 1, "head", C, HID, bias=False)]


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(HID, D_IN, generator=g, dtype=torch.float64),
            "b1": torch.randn(HID, generator=g, dtype=torch.float64) * 0.1,
            "W2": torch.randn(C, HID, generator=g, dtype=torch.float64)}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def _per_sample(params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Exact per-sample gradients, one backward per sample (layout: grad W row-major, then grad b)."""
    feats = {"l1": [], "l2": []}
    losses, correct = [], []
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        logits = torch.tanh(x[i] @ p["W1"].T + p["b1"]) @ p["W2"].T
        loss = torch.nn.functional.cross_entropy(logits[None], y[i:i + 1])
        gW1, gb1, gW2 = torch.autograd.grad(loss, [p["W1"], p["b1"], p["W2"]])
        feats["l1"].append(torch.cat([gW1.flatten(), gb1]).numpy())
        feats["l2"].append(gW2.flatten().numpy())
        losses.append(float(loss.detach()))
        correct.append(int(logits.argmax()) == int(y[i]))
    return {k: np.stack(v) for k, v in feats.items()}, np.array(losses), np.array(correct)


def _store(path, feats, losses, correct, ids, **kw) -> GradientStore:
    return GradientStore.from_arrays(path, feats, units=UNITS, dtype="float32",
                                     meta={"ids": ids, "loss": losses, "correct": correct}, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(test store, train store, float64 test features, float64 train features) of one tiny model."""
    root = tmp_path_factory.mktemp("est")
    params = _params(0)
    G, lg, cg = _per_sample(params, *_data(60, 1))
    Q, lq, cq = _per_sample(params, *_data(9, 2))
    train = _store(root / "train", G, lg, cg, 1000 + np.arange(60))
    test = _store(root / "test", Q, lq, cq, 50 + np.arange(9))
    r32 = lambda d: {k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}  # noqa: E731
    return test, train, r32(Q), r32(G), lg


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 2e-6) -> None:
    """Scores are stored as float32: relative error ≲ float32 eps times a small factor."""
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, f"max relative error {err:.2e} (tolerance {rtol:.0e})"


def _inv(G: np.ndarray, lam: float) -> np.ndarray:
    N, k = G.shape
    return np.linalg.inv(G.T @ G / N + lam * np.eye(k))


def _lam(G: np.ndarray, rel: float = 0.1) -> float:
    return rel * (G * G).sum() / G.size


@pytest.mark.parametrize("method", ["graddot", "gradcos", "if", "datainf"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_pairwise_methods_match_bruteforce(pair, method, precision):
    test, train, Q, G, _ = pair
    s = score(test, train, method, precision=precision)
    assert s.unit_names == ["l1", "l2"] and (s.n_test, s.n_train) == (9, 60)
    np.testing.assert_array_equal(s.train_ids, 1000 + np.arange(60))
    np.testing.assert_array_equal(s.test_ids, 50 + np.arange(9))
    for u in s.unit_names:
        q, g = Q[u], G[u]
        if method == "graddot":
            want = q @ g.T
        elif method == "gradcos":
            want = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
        elif method == "if":
            want = q @ _inv(g, _lam(g)) @ g.T
        else:
            want = datainf_reference(q, g)
        _close(s.unit_scores(u), want, 2e-6 if precision == "float64" else 2e-5)


def test_if_absolute_damping_and_lowrank_error_shrinks(pair):
    test, train, Q, G, _ = pair
    q, g = Q["l1"], G["l1"]                                   # k = 24
    exact = q @ _inv(g, 1e-2) @ g.T
    _close(score(test, train, "if", "l1", damping=1e-2, precision="float64").unit_scores("l1"), exact)
    errs = []
    for r in (2, 8, 16, 23):
        got = score(test, train, "if", "l1", damping=1e-2, rank=r, precision="float64",
                    curvature_options={"n_iter": 4}).unit_scores("l1")
        errs.append(np.abs(got - exact).max() / np.abs(exact).max())
    assert errs == sorted(errs, reverse=True), f"low-rank error must shrink as r grows: {errs}"
    assert errs[-1] < 0.1 * errs[0]


def test_streaming_datainf_equals_literal_formula(pair):
    """Large-k DataInf (no k×k matrix: one pass over the train store per query block)."""
    test, train, Q, G, _ = pair
    s = score(test, train, "datainf", precision="float64", curvature_options={"max_dense_k": 4})
    for u in s.unit_names:
        _close(s.unit_scores(u), datainf_reference(Q[u], G[u]))


def test_lissa_converges_to_exact_if(pair):
    test, train, Q, G, _ = pair
    g = G["l2"]
    top = np.linalg.eigvalsh(g.T @ g / len(g))[-1]
    s = score(test, train, "lissa", "l2", damping=0.05, precision="float64",   # scale: just above λ_max + λ
              curvature_options={"lissa_depth": 20000, "lissa_tol": 1e-12, "lissa_scale": 1.05 * top + 0.05})
    _close(s.unit_scores("l2"), Q["l2"] @ _inv(G["l2"], 0.05) @ G["l2"].T, 1e-5)


def test_selfinf_and_loss_rows(pair):
    test, train, _, G, losses = pair
    s = score(None, train, "selfinf", precision="float64")
    assert s.n_test == 1 and s.test_correct is None
    for u in s.unit_names:
        g = G[u]
        want = -np.einsum("nk,kj,nj->n", g, _inv(g, _lam(g)), g)          # −g_iᵀ H⁻¹ g_i
        _close(s.unit_scores(u)[0], want)
    base = score(None, train, "loss")
    assert base.unit_names == ["loss"]
    np.testing.assert_allclose(base.unit_scores("loss")[0], -losses, rtol=1e-6)


def test_tracin_sums_checkpoints_weighted_by_learning_rate(tmp_path):
    feats, stores = [], []
    for c, lr in enumerate((0.5, 0.125)):
        params = _params(10 + c)
        G, lg, cg = _per_sample(params, *_data(40, 1))
        Q, lq, cq = _per_sample(params, *_data(6, 2))
        stores.append((_store(tmp_path / f"te{c}", Q, lq, cq, np.arange(6), model_name=f"ckpt{c}"),
                       _store(tmp_path / f"tr{c}", G, lg, cg, np.arange(40), model_name=f"ckpt{c}"), lr))
        feats.append((Q, G, lr))
    s = score(None, None, "tracin", checkpoints=stores, precision="float64")
    for u in ("l1", "l2"):
        want = sum(lr * Q[u].astype(np.float32).astype(np.float64) @ G[u].astype(np.float32).astype(np.float64).T
                   for Q, G, lr in feats)
        _close(s.unit_scores(u), want)
    single = score(stores[0][0], stores[0][1], "tracin")
    np.testing.assert_allclose(single.unit_scores("l1"), score(stores[0][0], stores[0][1], "graddot").unit_scores("l1"))


def _embedding_samples(n: int, L: int, V: int, d: int, seed: int):
    """Token ids [n, L] (-1 pad, repeated tokens) and the per-position output gradients of a tiny
    embedding -> mean-pool -> linear classifier, plus the exact embedding gradient (Eᵀ layout d × V)."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, d, generator=g, dtype=torch.float64)
    W = torch.randn(C, d, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    toks = np.full((n, L), -1, np.int32)
    grads = np.zeros((n, L, d), np.float32)
    exact = np.zeros((n, d * V))
    for i in range(n):
        ids = tokens[i, :lengths[i]]
        h = E[ids].clone().requires_grad_(True)                             # (T, d) embedding outputs
        loss = torch.nn.functional.cross_entropy((h.mean(0) @ W.T)[None], y[i:i + 1])
        (gh,) = torch.autograd.grad(loss, h)
        toks[i, :len(ids)] = ids.numpy()
        grads[i, :len(ids)] = gh.numpy()
        gE = torch.zeros(V, d, dtype=torch.float64).index_add_(0, ids, gh.to(torch.float32).to(torch.float64))
        exact[i] = gE.T.flatten().numpy()                                   # W = Eᵀ: (d, V) row-major
    return toks, grads, exact


def test_tracin_we_equals_literal_definition_and_exact_embedding_graddot(tmp_path):
    V, d, L = 13, 3, 6
    tq, gq, eq = _embedding_samples(7, L, V, d, 0)
    tg, gg, eg = _embedding_samples(25, L, V, d, 1)
    unit = [Unit("embed", "embedding", -1, "embed", d, V, bias=False)]
    mk = lambda p, t, g, e: GradientStore.from_arrays(  # noqa: E731
        p, {"embed": e}, units=unit, dtype="float32", extras={"tokens": t, "embed_grads": g})
    test, train = mk(tmp_path / "te", tq, gq, eq), mk(tmp_path / "tr", tg, gg, eg)
    literal = tracin_we_reference(tq, gq, tg, gg)
    we = score(test, train, "tracin_we", precision="float64", block_bytes=1 << 16)
    assert we.unit_names == ["embed"]
    _close(we.unit_scores("embed"), literal)
    _close(score(test, train, "graddot", precision="float64").unit_scores("embed"), literal)
    for side in ("test", "train", "both"):
        top = score(test, train, "tracin_we", topk_tokens=2, topk_side=side, precision="float64")
        _close(top.unit_scores("embed"), tracin_we_reference(tq, gq, tg, gg, topk=2, topk_side=side))


def test_token_rows_sum_repeated_tokens_and_keep_topk():
    toks = np.array([[3, 1, 3, -1], [2, 2, 2, 2]])
    grads = np.arange(2 * 4 * 2, dtype=np.float64).reshape(2, 4, 2)
    r = token_rows(toks, grads, dtype=np.float64)
    rows = {(int(s), int(t)): row for s, t, row in zip(r.sample, r.token, r.rows)}
    np.testing.assert_allclose(rows[(0, 3)], grads[0, 0] + grads[0, 2])
    np.testing.assert_allclose(rows[(1, 2)], grads[1].sum(0))
    assert (0, -1) not in rows and len(rows) == 3
    top = token_rows(toks, grads, topk=1, dtype=np.float64)
    assert sorted(zip(top.sample.tolist(), top.token.tolist())) == [(0, 3), (1, 2)]
    np.testing.assert_allclose(tracin_we_arrays(r, r), tracin_we_reference(toks, grads, toks, grads))


def test_repsim_is_cosine_per_block(tmp_path):
    rng = np.random.default_rng(0)
    rq, rg = rng.standard_normal((5, 4, 6)), rng.standard_normal((30, 4, 6))
    def mk(path, reps):
        return GradientStore.from_arrays(path, {"u": rng.standard_normal((len(reps), 3))}, dtype="float32",
                                         extras={"reps": reps.astype(np.float32)})
    s = score(mk(tmp_path / "te", rq), mk(tmp_path / "tr", rg), "repsim", precision="float64")
    assert s.unit_names == ["reps.0", "reps.1", "reps.2", "reps.3"]
    assert [u.block for u in s.units] == [-1, 0, 1, 2]
    for b in range(4):
        q = rq[:, b].astype(np.float32).astype(np.float64)
        g = rg[:, b].astype(np.float32).astype(np.float64)
        want = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
        _close(s.unit_scores(f"reps.{b}"), want)
    mid = score(mk(tmp_path / "te2", rq), mk(tmp_path / "tr2", rg), "repsim", "blocks[1:2]")
    assert mid.unit_names == ["reps.2"]


@pytest.mark.parametrize("method", ["graddot", "gradcos", "if", "datainf"])
def test_block_size_does_not_change_scores(tmp_path, method):
    rng = np.random.default_rng(1)
    tr = GradientStore.from_arrays(tmp_path / "tr", {"a": rng.standard_normal((700, 32))}, dtype="float16")
    te = GradientStore.from_arrays(tmp_path / "te", {"a": rng.standard_normal((300, 32))}, dtype="float16")
    small = score(te, tr, method, block_bytes=1 << 16)        # 3 test blocks x 9 train blocks
    big = score(te, tr, method)
    np.testing.assert_allclose(small.unit_scores("a"), big.unit_scores("a"), rtol=1e-5, atol=1e-5)
    want = score_arrays(te.features("a").astype(np.float64), tr.features("a").astype(np.float64), method,
                        precision="float64")
    _close(big.unit_scores("a"), want, 2e-5)
