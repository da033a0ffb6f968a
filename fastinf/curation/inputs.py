"""The inputs of ``fastinf curate``: the train data (any source), the reference set and the model.

* Train data: a path (``.parquet``/``.jsonl``/``.csv``/``.tsv``, a ``datasets`` ``save_to_disk``
  directory) or, in the API, a ``datasets.Dataset``, a ``pyarrow.Table``, a dict of columns or a list of
  rows. It is read with :func:`fastinf.data.as_text_dataset`; the *source* is kept as given, because the
  cleaned / annotated dataset is written back in the source's own format.
* Reference set (the samples whose loss the train samples help or hurt): a held-out split (any source the
  train data may be), or a seeded fraction / number of rows held out of the train data. Held-out rows are
  not scored; they stay in the written dataset (they were not judged).
* Model: a ``fastinf train`` output directory (its selected checkpoint), a checkpoint directory, or any
  model ``fastinf.load_model`` accepts; with a *recipe* (the ``model``/``train`` sections of a run config)
  it is fine-tuned first, on the scored rows, with the reference set as the held-out set.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, DataError

__all__ = ["CurationData", "load_source", "packaged_path", "texts_at", "split_reference", "is_hf_disk_dir", "resolve_model", "read_recipe"]


@dataclass
class CurationData:
    """The train source, its rows as a TextDataset, and which rows are scored / held out as reference."""

    source: Any                 # what the user passed (written back in its own format)
    full: Any                   # TextDataset of every source row (ids 0..N-1 = row positions)
    scored: np.ndarray          # int64 row positions that are scored
    reference: Any              # TextDataset of the reference samples
    held_out: np.ndarray        # int64 row positions of ``full`` held out as reference (may be empty)

    @functools.cached_property
    def train(self) -> Any:
        """The scored rows as a TextDataset (ids = their row positions in the source)."""
        return self.full if len(self.scored) == len(self.full) else self.full.subset(self.scored)


def is_hf_disk_dir(path: Any) -> bool:
    """Whether ``path`` is a directory written by ``datasets.Dataset.save_to_disk``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def packaged_path(source: Any) -> Any:
    """``"sms"`` (the packaged SMS spam set every other command accepts as ``--data sms``) as its dataset, an
    in-memory source (written back as Parquet: the packaged file is not the user's to mirror); anything else
    unchanged."""
    if isinstance(source, str) and source == "sms":
        from fastinf.data.datasets import load_sms

        return load_sms()
    return source


def load_source(source: Any, what: str = "train") -> Any:
    """``source`` as a (possibly lazy, Arrow-backed) text dataset with ids = row positions; a one-line
    DataError for what cannot be read. The caller's dataset object is never modified."""
    from fastinf.data import as_text_dataset

    if isinstance(source, (str, os.PathLike)) and not Path(source).expanduser().exists():
        raise DataError(f"{what} data {str(source)!r}: file not found; give a .parquet/.jsonl/.csv/.tsv file "
                        "or a datasets save_to_disk directory")
    ds = as_text_dataset(source)           # the data layer reads every source kind itself (lazy for Arrow)
    rows = np.arange(len(ds), dtype=np.int64)
    if not np.array_equal(ds.ids, rows):
        ds = copy.copy(ds)                               # ids = row positions, on a copy
        ds.ids = rows
    return ds


def texts_at(ds: Any, rows: np.ndarray) -> list[str]:
    """The texts of ``rows`` (one Arrow take for a lazy dataset, list indexing otherwise)."""
    if hasattr(ds, "text_batch"):
        return ds.text_batch(np.asarray(rows, np.int64))[0]
    return [ds.texts[int(i)] for i in rows]


def _n_reference(n: int, fraction: float | None, rows: int | None) -> int:
    """How many rows to hold out: ``rows``, or ``fraction`` of ``n`` (rounded half up); at least one
    row each side."""
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"reference_fraction: expected a fraction in (0, 1), found {fraction!r}")
        k = int(math.floor(fraction * n + 0.5))
    else:
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ConfigError(f"reference_rows: expected a positive number of rows, found {rows!r}")
        k = int(rows)
    if not 1 <= k < n:
        raise ConfigError(f"holding out {k} of {n} rows leaves no reference or no train rows; choose a "
                          "reference fraction / row count that leaves both")
    return k


def split_reference(source: Any, full: Any, reference: Any = None, *, fraction: float | None = None,
                    rows: int | None = None, seed: int = 0) -> CurationData:
    """Pick the reference set: a separate split, or ``fraction`` / ``rows`` of ``full`` held out (seeded)."""
    given = sum(x is not None for x in (reference, fraction, rows))
    if given != 1:
        raise ConfigError("give exactly one reference: a held-out split (--reference FILE) or a share of the "
                          "train data (--reference-fraction F or --reference-rows N)")
    n = len(full)
    if reference is not None:
        from fastinf.data.labels import align_label_names

        ref = align_label_names(load_source(reference, "reference"), full)   # string labels: the train's classes
        return CurationData(source, full, np.arange(n, dtype=np.int64), ref, np.zeros(0, np.int64))
    k = _n_reference(n, fraction, rows)
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k]).astype(np.int64)
    mask = np.ones(n, bool)
    mask[held] = False
    ref = full.subset(held, name=f"{full.name} (held-out reference)")
    return CurationData(source, full, np.flatnonzero(mask).astype(np.int64), ref, held)


def resolve_model(model: Any) -> str:
    """The model to load: a ``fastinf train`` directory means its selected checkpoint; anything else is
    passed on (a checkpoint directory, a Hugging Face directory, ``"minilm"``)."""
    if model is None:
        raise ConfigError("no model: give --model (a `fastinf train` output, a checkpoint or a model directory)")
    p = Path(str(model)).expanduser()
    if p.is_dir() and (p / "train.json").is_file() and not (p / "config.json").is_file():
        from fastinf.experiment.train import TrainResult

        return str(TrainResult.load(p).best.path)
    if (p.suffix or os.sep in str(model)) and not p.exists():
        raise ConfigError(f"model {str(model)!r}: no such directory; give a `fastinf train` output, a checkpoint "
                          "or a model directory")
    return str(model)


def read_recipe(recipe: Any, model: Any) -> tuple[Any, Any]:
    """The (ModelConfig, TrainConfig) of a fine-tune recipe: a run-config YAML path, a RunConfig, a dict of
    its sections, or ``True`` / ``"default"`` (the defaults); ``model`` (if given) names the base model."""
    from fastinf.experiment.config import RunConfig, from_dict, to_dict

    if isinstance(recipe, RunConfig):
        cfg = recipe
    elif recipe is True or recipe == "default":
        cfg = RunConfig()
    elif isinstance(recipe, dict):
        cfg = from_dict(RunConfig, {k: v for k, v in recipe.items() if k in ("model", "train")})
    elif isinstance(recipe, (str, os.PathLike)):
        cfg = RunConfig.from_yaml(recipe)
    else:
        raise ConfigError(f"recipe: expected a run-config YAML path, a RunConfig or a dict, found {type(recipe).__name__}")
    d = to_dict(cfg)
    if model is not None:
        d["model"]["name"] = str(model)
    cfg = from_dict(RunConfig, d)
    return cfg.model, cfg.train
