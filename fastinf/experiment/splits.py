"""The data of ``fastinf run``: the (train, test) split of ``cfg.data``, loaded, split and subsampled.

Kept apart from the pipeline because it is the one stage that is not cached (loading is cheap and its
fingerprint feeds the noise stage's hash) and because ``fastinf train`` uses it on its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fastinf.experiment.config import RunConfig
from fastinf.errors import DataError

__all__ = ["load_splits"]


def _load_spec(spec: Any, default_split: str):
    from fastinf.data.datasets import load_dataset_spec

    if isinstance(spec, str):
        return load_dataset_spec(spec, split=default_split)
    kw = dict(spec)
    path = kw.pop("path")
    kw.setdefault("split", default_split)
    return load_dataset_spec(str(path), **kw)


def load_splits(cfg: RunConfig):
    """(train, test) ``TextDataset``s per ``cfg.data``: loaded, split if needed, subsampled (seeded)."""
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
    for name, ds in (("training", train), ("test", test)):
        if ds.labels is None:
            raise DataError(f"the {name} set has no labels; fastinf run needs labelled data")
        classes = np.unique(ds.labels)
        if name == "training" and classes.size < 2:
            raise DataError(f"the training set has a single class ({int(classes[0])}); label noise and a "
                            "classifier both need at least two. Check the label column or data.n_train.")
    return train, test
