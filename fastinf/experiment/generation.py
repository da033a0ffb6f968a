"""Generation-task evaluation (the seed paper's causal-LM evaluation): do per-layer influence scores find the
training samples of the same transformation?

:func:`generation_eval` takes a causal LM, its tokenizer and (train, test) samples with prompts, targets and
class labels (e.g. :func:`fastinf.experiment.templated_task.templated_splits`), and

1. tokenizes ``prompt + " " + target + eos``; the loss is the mean next-token NLL over the **target** tokens
   only (prompt and padding labels are -100: ``fastinf.extraction.models.CausalLM``);
2. extracts per-unit projected gradients in memory (``features_for_batch``, one forward + one backward per
   batch, ``proj`` Kronecker projection) of the selected units;
3. scores test x train per unit with ``graddot``, ``gradcos``, ``if`` and ``datainf`` (``score_arrays``), plus
   the group ``all`` (the mean of the per-unit score matrices); and the representation baselines per block,
   ``repsim_last`` (cosine of the block output at the last real token) and ``repsim_mean`` (cosine of its
   mean over real tokens);
4. per test sample, the ROC-AUC of its score row against "same class" and recall@k (``|top-k ∩ same class| /
   min(k, |same class|)``; ties broken by train index), aggregated as mean ± 1.96·sd/√M over test samples.

``ekfac`` is not offered here: it needs eigenbasis (pca) projections fitted by ``fastinf.fit_factors`` over a
GradientStore and a store-backed preconditioner; this in-memory path does not build stores (run ``fastinf
extract --proj pca16x16@FACTORS`` + ``fastinf score --method ekfac`` for that).

:func:`tune_causal_lm` optionally fine-tunes the model first (a few seeded AdamW epochs on the train targets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fastinf.errors import ConfigError

__all__ = ["GenerationTable", "generation_eval", "row_auc", "recall_at_k", "per_test_metrics", "tune_causal_lm",
           "encode_prompt_target"]

GRAD_METHODS = ("graddot", "gradcos", "if", "datainf")
REP_METHODS = ("repsim_last", "repsim_mean")


@dataclass
class GenerationTable:
    """One row per (method, unit or group): mean AUC / recall@k over test samples with 95% CIs."""

    rows: list[dict[str, Any]]
    k: int
    setup: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        head = f"| method | unit | AUC (95% CI) | recall@{self.k} (95% CI) |\n|---|---|---|---|\n"
        return head + "".join(
            f"| {r['method']} | {r['unit']} | {r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}] | "
            f"{r['recall']:.3f} [{r['recall_lo']:.3f}, {r['recall_hi']:.3f}] |\n" for r in self.rows)


def row_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of one score row against a boolean ``positive`` mask (Mann-Whitney, ties count one half)."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """``|top-k ∩ positive| / min(k, |positive|)``; the top-k by descending score, ties by lower index."""
    pos = np.asarray(positive, bool)
    if pos.sum() == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
    return float(pos[top].sum() / min(k, int(pos.sum())))


def per_test_metrics(scores: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per test row of ``scores`` [M, N]: (AUC, recall@k) against "the train sample has the test's class"."""
    s, ytr = np.asarray(scores), np.asarray(train_labels)
    same = [ytr == y for y in np.asarray(test_labels)]
    return (np.array([row_auc(s[m], same[m]) for m in range(len(same))]),
            np.array([recall_at_k(s[m], same[m], k) for m in range(len(same))]))


def _ci(v: np.ndarray) -> tuple[float, float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else 0.0
    return float(v.mean()), float(v.mean()) - half, float(v.mean()) + half


def encode_prompt_target(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int
                         ) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + " " + target + eos`` ids, mask, and labels (-100 on prompt and padding)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    seqs, labs = [], []
    for p, t in zip(prompts, targets):
        a = tokenizer(p, add_special_tokens=False)["input_ids"]
        b = tokenizer(" " + t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (a + b)[:max_length]
        if len(a) >= len(ids):
            raise ConfigError(f"max_length {max_length} leaves no target token for prompt {p!r}; raise it")
        seqs.append(ids)
        labs.append([-100] * len(a) + ids[len(a):])
    T = max(len(s) for s in seqs)
    out = {"input_ids": torch.full((len(seqs), T), pad, dtype=torch.long),
           "attention_mask": torch.zeros((len(seqs), T), dtype=torch.long),
           "labels": torch.full((len(seqs), T), -100, dtype=torch.long)}
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        out["input_ids"][i, :len(s)] = torch.tensor(s)
        out["attention_mask"][i, :len(s)] = 1
        out["labels"][i, :len(s)] = torch.tensor(lab)
    return out


def _batches(enc: dict[str, torch.Tensor], batch_size: int):
    n = enc["input_ids"].shape[0]
    for s in range(0, n, batch_size):
        part = {k: v[s:s + batch_size] for k, v in enc.items()}
        t = int(part["attention_mask"].sum(1).max())
        yield {k: v[:, :t] for k, v in part.items()}


def _features(model: Any, units: list, spec: Any, enc: dict[str, torch.Tensor], batch_size: int
              ) -> dict[str, np.ndarray]:
    """Per-unit projected per-sample gradients [n, k] (float64) of the target-token loss."""
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import CausalLM
    from fastinf.extraction.projection import UnitProjector

    projectors = {u.name: UnitProjector(u, spec) for u in units}
    parts: dict[str, list[np.ndarray]] = {u.name: [] for u in units}
    for batch in _batches(enc, batch_size):
        bf = features_for_batch(model, units, projectors, batch, CausalLM())
        for name, f in bf.features.items():
            parts[name].append(f.detach().double().cpu().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


@torch.no_grad()
def _reps(model: Any, enc: dict[str, torch.Tensor], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(last-token, token-mean) block outputs [n, B, d] (hidden states 1..B: the transformer blocks)."""
    was = model.training
    model.eval()
    last, mean = [], []
    for batch in _batches(enc, batch_size):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = torch.stack(out.hidden_states[1:], dim=1).double()             # [b, B, T, d]
        m = batch["attention_mask"].double()
        end = batch["attention_mask"].sum(1) - 1
        last.append(h[torch.arange(h.shape[0]), :, end].numpy())
        mean.append(((h * m[:, None, :, None]).sum(2) / m.sum(1)[:, None, None]).numpy())
    model.train(was)
    return np.concatenate(last), np.concatenate(mean)


def _cos(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
    return qn @ gn.T


def _score_grid(Q: dict[str, np.ndarray], G: dict[str, np.ndarray], methods: Sequence[str]
                ) -> list[tuple[str, str, np.ndarray]]:
    """(method, unit, scores [M, N]) per unit and for the group ``all`` (mean of the unit matrices)."""
    from fastinf.scoring.pairwise import score_arrays

    out = []
    for method in methods:
        mats = [(name, score_arrays(Q[name], G[name], method, precision="float64")) for name in G]
        out += [(method, name, s) for name, s in mats]
        out.append((method, "all", np.mean([s for _, s in mats], axis=0)))
    return out


def generation_eval(model: Any, tokenizer: Any, train: Any, test: Any, *, layers: Any = "all",
                    proj: str = "8x8", methods: Sequence[str] = GRAD_METHODS, repsim: bool = True, k: int = 5,
                    max_length: int = 64, batch_size: int = 8) -> GenerationTable:
    """Score ``test`` x ``train`` per unit and method and evaluate against same-class ground truth (module doc).

    ``train``/``test`` need ``prompts``, ``targets`` and ``labels``; ``layers`` is a unit selector
    (``fastinf.select_units``), ``proj`` a projection spec ("8x8", "exact")."""
    from fastinf.extraction.projection import ProjectionSpec
    from fastinf.extraction.units import discover, select

    bad = [m for m in methods if m not in GRAD_METHODS]
    if bad:
        raise ConfigError(f"generation_eval: unknown method {bad[0]!r}; use some of {', '.join(GRAD_METHODS)}")
    units = select(discover(model), layers)
    if not units:
        raise ConfigError(f"generation_eval: the selector {layers!r} matches no unit of the model")
    enc_tr = encode_prompt_target(tokenizer, train.prompts, train.targets, max_length)
    enc_te = encode_prompt_target(tokenizer, test.prompts, test.targets, max_length)
    spec = proj if isinstance(proj, ProjectionSpec) else ProjectionSpec.parse(proj)
    G, Q = _features(model, units, spec, enc_tr, batch_size), _features(model, units, spec, enc_te, batch_size)
    grid = _score_grid(Q, G, methods)
    if repsim:
        (lt, mt), (lq, mq) = _reps(model, enc_tr, batch_size), _reps(model, enc_te, batch_size)
        for b in range(lt.shape[1]):
            grid += [("repsim_last", f"block[{b}]", _cos(lq[:, b], lt[:, b])),
                     ("repsim_mean", f"block[{b}]", _cos(mq[:, b], mt[:, b]))]
    rows = [_row(method, unit, s, train.labels, test.labels, k) for method, unit, s in grid]
    return GenerationTable(rows=rows, k=k, setup={"n_train": len(train.prompts), "n_test": len(test.prompts),
                                                  "units": [u.name for u in units], "proj": str(proj),
                                                  "classes": int(len(np.unique(train.labels)))})


def _row(method: str, unit: str, scores: np.ndarray, ytr: Any, yte: Any, k: int) -> dict[str, Any]:
    auc, rec = per_test_metrics(scores, ytr, yte, k)
    a, r = _ci(auc), _ci(rec)
    return {"method": method, "unit": unit, "auc": a[0], "auc_lo": a[1], "auc_hi": a[2],
            "recall": r[0], "recall_lo": r[1], "recall_hi": r[2], "n_test": int(len(auc))}


def tune_causal_lm(model: Any, tokenizer: Any, train: Any, *, epochs: int = 1, lr: float = 1e-4,
                   batch_size: int = 8, max_length: int = 64, seed: int = 0) -> list[float]:
    """Fine-tune ``model`` in place on the target tokens of ``train`` (AdamW, seeded order); per-epoch losses."""
    from fastinf.extraction.models import CausalLM

    enc = encode_prompt_target(tokenizer, train.prompts, train.targets, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen, task, losses = torch.Generator().manual_seed(seed), CausalLM(), []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(enc["input_ids"].shape[0], generator=gen)
        shuffled = {kk: v[order] for kk, v in enc.items()}
        total = []
        for batch in _batches(shuffled, batch_size):
            loss = task.per_sample_loss(model, batch)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total.append(float(loss.detach()))
        losses.append(float(np.mean(total)))
    model.eval()
    return losses
