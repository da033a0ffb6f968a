"""Costs of unit groups (the report's cost-versus-quality table): extraction time, bytes, scoring time.

For each named group, the capture of one batch of ``extract.cost_samples`` training samples
restricted to that group's units (forward, backward down to the group's lowest unit, projections) is
timed, fastest of ``extract.cost_repeats``; its share of the all-units time is the group's extraction
cost. Bytes per sample come from the stores' feature sizes; scoring time is measured per method and
apportioned by feature dimension (in total, ``score_s``, and per method, ``score_s.<method>``, so kfac / ekfac
sit next to graddot); the K-FAC factor pass, when the run has one, is ``factor_s`` (split by extraction share);
over seeds the measurements are averaged.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from fastinf.experiment.config import RunConfig

__all__ = ["measure_group_costs", "itemsize", "apportion_score_time", "mean_costs"]


def itemsize(dtype: str) -> int:
    """Bytes per stored feature value of ``dtype``."""
    return {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}[dtype]


def measure_group_costs(model, tokenizer, ds, named_groups: dict[str, list[str]], units, train_store,
                        cfg: RunConfig) -> list[dict[str, Any]]:
    """Per-group extraction cost: the capture of one batch of ``extract.cost_samples`` training samples
    (forward + backward to the group's lowest unit + its projections), restricted to the group's units.

    The same batch is used for every group and for all units; after one warm-up call each is timed
    ``extract.cost_repeats`` times and the fastest kept, the estimate least disturbed by other
    processes on a shared machine.
    """
    import torch

    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.projection import UnitProjector

    ex = cfg.extract
    rows, batch = _cost_batch(tokenizer, ds, cfg)
    spec = _timing_spec(ex.proj)
    by_name = {u.name: u for u in units}
    projectors = {u.name: UnitProjector(u, spec, device=torch.device("cpu")) for u in units}

    def fastest(names: list[str]) -> float:
        return _fastest(model, [by_name[n] for n in names], projectors, batch, ex.cost_repeats)

    all_names = [u.name for u in units]
    features_for_batch(model, units, projectors, batch, "seq-cls")          # warm-up
    t_all = fastest(all_names)
    size = itemsize(ex.dtype)
    out = []
    for g, names in named_groups.items():
        t = t_all if sorted(names) == sorted(all_names) else fastest(names)
        dim = int(sum(train_store.feature_dim(n) for n in names))
        out.append({"group": g, "n_units": len(names), "bytes_per_sample": dim * size,
                    "extract_s_per_1k": 1000.0 * t / rows.size, "extract_share": _share(t, t_all),
                    "feature_dim": dim})
    return out


def _share(t: float, t_all: float) -> float | None:
    """A group's time relative to all units, at most 1: a subset of the units never costs more than all of
    them, so a larger measured ratio is timing noise and is reported as 100%."""
    return min(1.0, t / t_all) if t_all > 0 else None


def _timing_spec(proj: str) -> Any:
    """The projection to time: a pca / pcamix / kfac projection costs what the random Kronecker one of the same
    shape costs (its factor matrices fold into P_out / P_in), so it is timed as that (no factor set needed)."""
    from fastinf.extraction.projection import ProjectionSpec

    base = proj.split("@")[0]
    for kind in ("pcamix", "pca", "kfac"):
        if base.lower().startswith(kind):
            base = base[len(kind):]
            break
    return ProjectionSpec.parse(base, seed=0)


def _cost_batch(tokenizer, ds, cfg: RunConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """The timed batch: the first ``extract.cost_samples`` samples of ``ds``, tokenised, with labels."""
    import torch

    rows = np.arange(min(cfg.extract.cost_samples, len(ds)))
    texts = [ds.texts[i] for i in rows]
    pairs = [ds.text_pairs[i] for i in rows] if ds.text_pairs is not None else None
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=cfg.model.max_length,
                    return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.as_tensor(ds.labels[rows], dtype=torch.long)
    return rows, batch


SPREAD_TOL = 0.05    # the two fastest timings must agree within 5% ...
MAX_REPEAT_FACTOR = 3  # ... or at most 3 x extract.cost_repeats timings are taken


def _fastest(model, sel, projectors, batch: dict[str, Any], repeats: int) -> float:
    """The fastest of at least ``repeats`` timed captures of ``batch`` restricted to the units ``sel``.

    Noise-robust on a shared machine: with ``repeats >= 2`` it keeps timing until the two fastest runs agree
    within ``SPREAD_TOL`` (a disturbed run is slower, never faster), up to ``MAX_REPEAT_FACTOR * repeats``."""
    from fastinf.extraction.capture import features_for_batch

    times: list[float] = []
    limit = repeats if repeats < 2 else MAX_REPEAT_FACTOR * repeats
    while len(times) < limit:
        t = time.perf_counter()
        features_for_batch(model, sel, projectors, batch, "seq-cls")
        times.append(time.perf_counter() - t)
        if len(times) >= repeats and len(times) >= 2:
            a, b = sorted(times)[:2]
            if b - a <= SPREAD_TOL * a:
                break
    return min(times)


def apportion_score_time(costs: list[dict[str, Any]], score_times: dict[str, float], train_store,
                         factor_s: float | None = None) -> None:
    """Split the measured scoring time of all methods over the groups by feature dimension (also per method:
    ``score_s.<method>``); the factor pass of kfac / ekfac / pca projections (``factor_s``, one forward and
    backward over the train split, like extraction) is split by each group's extraction share."""
    total_dim = sum(train_store.feature_dim(n) for n in train_store.unit_names)
    total_s = sum(score_times.values())
    for c in costs:
        share = c["feature_dim"] / total_dim if total_dim else None
        c["score_s"] = total_s * share if share is not None else None
        for method, t in score_times.items():
            c[f"score_s.{method}"] = t * share if share is not None else None
        if factor_s is not None:
            ex = c.get("extract_share")
            c["factor_s"] = factor_s * ex if ex is not None else None


def mean_costs(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The per-group costs averaged over seeds (``None`` where no seed measured a value)."""
    if not per_seed:
        return []
    out = []
    for i, c in enumerate(per_seed[0]):
        d = dict(c)
        timed = ["extract_s_per_1k", "extract_share", "score_s"]
        timed += sorted({k for s in per_seed for k in s[i] if k.startswith("score_s.") or k == "factor_s"})
        for k in timed:
            vals = [s[i][k] for s in per_seed if s[i].get(k) is not None]
            d[k] = float(np.mean(vals)) if vals else None
        out.append(d)
    return out
