"""The data of ``fastinf run``: the training set and the named held-out splits of ``cfg.data``.

Split names (``SPLIT_NAMES``) and what each is for (DESIGN, Honest evaluation):

- ``"train"``      — the (to be noise-corrupted) training set;
- ``"select"``     — the checkpoint-selection split: its loss picks the scored checkpoint, early stopping
  watches it and ``lr: auto`` compares candidates by its accuracy;
- ``"influence"``  — the influence set: the test samples whose loss the training samples help or hurt
  (what :func:`load_splits` returns as ``test``);
- ``"evaluation"`` — the evaluation split: learned-or-refuse and any retrain accuracy are measured here, never
  on the samples that selected the checkpoint or were scored.

``data.heldout`` says how the held-out pool (``data.test``, or ``data.test_fraction`` of ``data.train``,
subsampled to ``data.n_test``) is divided, by a permutation seeded with ``data.split_seed``:

- ``"shared"`` (default, the earlier behaviour): the whole pool is all three splits;
- ``"paper"``: the paper's protocol — influence = one half of the pool, the other half is both the
  checkpoint-selection and the evaluation split;
- ``"separate"``: three disjoint thirds;
- a mapping ``{select: f, influence: f, evaluation: f}``: disjoint fractions of the pool (sum <= 1; each split
  gets at least one sample).

API::

    s = load_named_splits(cfg)      # Splits(train, select, influence, evaluation), loaded afresh
    s.get("evaluation")             # == evaluation_split(cfg); the retrain grid reads this one
    train, test = load_splits(cfg)  # (train, influence): what the pipeline has always read
    heldout_indices(n, spec, seed)  # {name: sorted pool rows}: the pure function the splits come from

Loading is not a cached stage (it is cheap and its fingerprint feeds the noise stage's hash); ``fastinf
train`` uses it on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, DataError
from fastinf.experiment.config import HELDOUT_SPLITS, RunConfig

__all__ = ["SPLIT_NAMES", "Splits", "load_splits", "load_named_splits", "heldout_indices", "evaluation_split",
           "selection_split", "influence_split"]

SPLIT_NAMES = ("train",) + HELDOUT_SPLITS
_PRESETS: dict[str, dict[str, float]] = {"separate": {"select": 1 / 3, "influence": 1 / 3, "evaluation": 1 / 3}}


@dataclass(frozen=True)
class Splits:
    """The four named splits (``TextDataset``s); with ``heldout: shared`` the last three are one object."""

    train: Any
    select: Any
    influence: Any
    evaluation: Any

    def get(self, name: str) -> Any:
        if name not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {name!r}; the splits are {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


def heldout_indices(n: int, spec: Any, seed: int) -> dict[str, np.ndarray]:
    """Rows of a held-out pool of ``n`` samples per split name (sorted; see the module doc for ``spec``).

    Disjoint splits are consecutive slices of one seeded permutation, sized ``floor(f * n)`` (at least 1);
    ``shared`` and the selection/evaluation half of ``paper`` share their rows."""
    every = np.arange(n, dtype=np.int64)
    if spec == "shared":
        return {k: every for k in HELDOUT_SPLITS}
    perm = np.random.default_rng(seed).permutation(n)
    if spec == "paper":
        half = n // 2
        influence, rest = np.sort(perm[:half]), np.sort(perm[half:])
        return {"select": rest, "influence": influence, "evaluation": rest}
    fractions = _PRESETS.get(spec, spec) if isinstance(spec, str) else spec
    sizes = [max(1, int(np.floor(fractions[k] * n + 1e-9))) for k in HELDOUT_SPLITS]
    if sum(sizes) > n or any(s < 1 for s in sizes):
        raise DataError(f"the held-out pool has {n} samples, too few for data.heldout {spec!r} "
                        f"(needs {sum(sizes)}); raise data.n_test or use heldout: shared")
    out, start = {}, 0
    for k, size in zip(HELDOUT_SPLITS, sizes):
        out[k] = np.sort(perm[start:start + size])
        start += size
    return out


def _load_spec(spec: Any, default_split: str):
    from fastinf.data.datasets import load_dataset_spec

    if isinstance(spec, str):
        return load_dataset_spec(spec, split=default_split)
    kw = dict(spec)
    path = kw.pop("path")
    kw.setdefault("split", default_split)
    return load_dataset_spec(str(path), **kw)


def _train_and_pool(cfg: RunConfig) -> tuple[Any, Any]:
    """(train, held-out pool) per ``cfg.data``: loaded, split if needed, subsampled (seeded)."""
    d = cfg.data
    full = _load_spec(d.train, "train")
    rng = np.random.default_rng(d.split_seed)
    if d.test is None:
        perm = rng.permutation(len(full))
        n_test = max(1, int(round(d.test_fraction * len(full))))
        test, train = full.subset(np.sort(perm[:n_test]), "test"), full.subset(np.sort(perm[n_test:]), "train")
    else:
        from fastinf.data.labels import align_label_names      # the test split maps label names like train
        train, test = full, align_label_names(_load_spec(d.test, "test"), full)
    if d.n_train is not None and d.n_train < len(train):
        train = train.subset(np.sort(rng.permutation(len(train))[:d.n_train]), train.name)
    if d.n_test is not None and d.n_test < len(test):
        test = test.subset(np.sort(rng.permutation(len(test))[:d.n_test]), test.name)
    _check_labelled(train, test)
    return train, test


def _check_labelled(train: Any, test: Any) -> None:
    for name, ds in (("training", train), ("test", test)):
        if ds.labels is None:
            raise DataError(f"the {name} set has no labels; fastinf run needs labelled data")
        classes = np.unique(ds.labels)
        if name == "training" and classes.size < 2:
            raise DataError(f"the training set has a single class ({int(classes[0])}); label noise and a "
                            "classifier both need at least two. Check the label column or data.n_train.")


def load_named_splits(cfg: RunConfig) -> Splits:
    """The named splits of ``cfg.data`` (deterministic by ``data.split_seed``; the held-out pool is divided
    with the seed ``split_seed + 1`` so that the subsampling and the division draw different permutations)."""
    train, pool = _train_and_pool(cfg)
    spec = cfg.data.heldout
    if spec == "shared":
        return Splits(train, pool, pool, pool)
    rows = heldout_indices(len(pool), spec, cfg.data.split_seed + 1)
    parts = {k: pool.subset(r, f"{pool.name}:{k}") for k, r in rows.items()}
    if spec == "paper":
        parts["evaluation"] = parts["select"]
    return Splits(train, parts["select"], parts["influence"], parts["evaluation"])


def load_splits(cfg: RunConfig):
    """(train, influence) ``TextDataset``s per ``cfg.data`` (the influence split is the run's test store)."""
    s = load_named_splits(cfg)
    return s.train, s.influence


def selection_split(cfg: RunConfig) -> Any:
    """The checkpoint-selection split (the held-out set of :func:`fastinf.experiment.train.finetune`)."""
    return load_named_splits(cfg).select


def influence_split(cfg: RunConfig) -> Any:
    """The influence set (scored against the training set)."""
    return load_named_splits(cfg).influence


def evaluation_split(cfg: RunConfig) -> Any:
    """The evaluation split: distinct from the influence split unless ``data.heldout: shared``."""
    return load_named_splits(cfg).evaluation
