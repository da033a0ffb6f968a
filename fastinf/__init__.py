"""fastinf: fast, layer-aware training-data influence estimation for language models.

Pipeline (one module per stage): units -> capture -> projection -> store -> curvature -> estimators
-> aggregate -> evaluate (and retrieval). The public API is listed in ``__all__``; names are loaded
lazily so that ``import fastinf`` stays cheap and never imports Triton, CUDA or transformers.

Example::

    import fastinf
    store = fastinf.extract(model, tokenizer, train_ds, out="train_store", layers="all", proj="16x16")
    test = fastinf.extract(model, tokenizer, test_ds, out="test_store", layers="all", proj="16x16")
    scores = fastinf.score(test, store, method="graddot")
    agg = fastinf.aggregate(scores, how="rank", groups=["middle", "all"])
    print(fastinf.ndr(agg["middle"], noise_mask, at=30))
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    # units, projection, capture, store, extraction
    "Unit": "fastinf.units",
    "discover_units": "fastinf.units",
    "select_units": "fastinf.units",
    "ProjectionSpec": "fastinf.projection",
    "GradientStore": "fastinf.store",
    "extract": "fastinf.extract",
    "load_model": "fastinf.models",
    "SequenceClassification": "fastinf.models",
    "CausalLM": "fastinf.models",
    "CustomLoss": "fastinf.models",
    # scoring
    "ScoreSet": "fastinf.scores",
    "score": "fastinf.estimators",
    "fit_preconditioner": "fastinf.curvature",
    # aggregation and evaluation
    "aggregate": "fastinf.aggregate",
    "ndr": "fastinf.evaluate",
    "ndr_curve": "fastinf.evaluate",
    "auc_ndr": "fastinf.evaluate",
    "aggregate_all": "fastinf.aggregate",
    "layer_table": "fastinf.evaluate",
    "cancellation_ratios": "fastinf.evaluate",
    "bootstrap_ci": "fastinf.evaluate",
    # retrieval
    "build_index": "fastinf.retrieval",
    "search": "fastinf.retrieval",
    "open_index": "fastinf.retrieval",
    "Index": "fastinf.retrieval",
    "SearchResult": "fastinf.search_results",
    # experiments and scale
    "inject_noise": "fastinf.data",
    "RunConfig": "fastinf.config",
    "run_experiment": "fastinf.pipeline",
    "finetune": "fastinf.train",
    "load_checkpoint": "fastinf.train",
    "write_report": "fastinf.report",
    "plan": "fastinf.plan",
    "Plan": "fastinf.plan",
    "score_distributed": "fastinf.dist_score",
}

_ALIASES = {"discover_units": "discover", "select_units": "select"}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'fastinf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
