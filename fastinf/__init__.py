"""fastinf: fast, layer-aware training-data influence estimation for language models.

Pipeline (one subpackage per stage): ``data`` -> ``extraction`` (units, capture, projection) -> ``store``
-> ``scoring`` (curvature, estimators) -> ``aggregation`` (aggregate, evaluate/NDR), plus ``retrieval``,
``experiment`` (train, run, report) and ``cli``; see docs/INTERNALS.md. The public API is listed in ``__all__``; names are loaded
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
    "Unit": "fastinf.extraction.units",
    "discover_units": "fastinf.extraction.units",
    "select_units": "fastinf.extraction.units",
    "ProjectionSpec": "fastinf.extraction.projection",
    "GradientStore": "fastinf.store.reader",
    "extract": "fastinf.extraction.extract",
    "load_model": "fastinf.extraction.models",
    "SequenceClassification": "fastinf.extraction.models",
    "CausalLM": "fastinf.extraction.models",
    "CustomLoss": "fastinf.extraction.models",
    "CheckpointCapture": "fastinf.extraction.callback",
    "StoreCallback": "fastinf.extraction.callback",
    # scoring
    "ScoreSet": "fastinf.scoring.scores",
    "score": "fastinf.scoring.estimators",
    "influence": "fastinf.scoring.fused",
    "score_while_extracting": "fastinf.scoring.extract_score",
    "fit_preconditioner": "fastinf.scoring.curvature",
    "fit_factors": "fastinf.extraction.factors",
    "Factors": "fastinf.extraction.factors_format",
    # aggregation and evaluation
    "aggregate": "fastinf.aggregation.aggregate",
    "ndr": "fastinf.aggregation.evaluate",
    "ndr_curve": "fastinf.aggregation.evaluate",
    "auc_ndr": "fastinf.aggregation.evaluate",
    "aggregate_all": "fastinf.aggregation.aggregate",
    "aggregate_per_test": "fastinf.aggregation.per_test",
    "PerTestAggregation": "fastinf.aggregation.per_test_io",
    "lds_score": "fastinf.aggregation.lds",
    "datamodels": "fastinf.experiment.datamodels",
    "GroundTruth": "fastinf.experiment.datamodels",
    "lds": "fastinf.experiment.lds_run",
    "layer_table": "fastinf.aggregation.evaluate",
    "cancellation_ratios": "fastinf.aggregation.evaluate",
    "bootstrap_ci": "fastinf.aggregation.evaluate",
    "balanced_ndr": "fastinf.aggregation.balanced",
    "check_learned": "fastinf.experiment.learned",
    # curation
    "curate": "fastinf.curation.curate",
    "CurationResult": "fastinf.curation.curate",
    # retrieval
    "build_index": "fastinf.retrieval.build",
    "search": "fastinf.retrieval.search",
    "open_index": "fastinf.retrieval.index",
    "Index": "fastinf.retrieval.index",
    "SearchResult": "fastinf.retrieval.results",
    # experiments and scale
    "inject_noise": "fastinf.data.noise",
    # data in and out (tables: Parquet, Arrow, HF datasets, jsonl/csv)
    "as_text_dataset": "fastinf.data.datasets",
    "ArrowTextDataset": "fastinf.data.lazy",
    "write_like": "fastinf.data.tables",
    "results_table": "fastinf.data.tables",
    "RunConfig": "fastinf.experiment.config",
    "run_experiment": "fastinf.experiment.pipeline",
    "finetune": "fastinf.experiment.train",
    "generation_eval": "fastinf.experiment.generation",
    "templated_splits": "fastinf.experiment.templated_task",
    "load_checkpoint": "fastinf.extraction.checkpoint",
    "write_report": "fastinf.experiment.report",
    "plan": "fastinf.extraction.plan",
    "Plan": "fastinf.extraction.plan",
    "score_distributed": "fastinf.scoring.dist_score",
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
