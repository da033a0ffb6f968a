"""The ``search`` facade: search an index (or its directory) with a store, arrays or a file of new texts.

``search`` opens the index when given a path and, for a dataset file of new texts, extracts a temporary
query store on the fly (``extract_queries``) with the model, units and projection recorded in the train
store, refusing a checkpoint whose fingerprint changed; the search itself is :meth:`Index.search`.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fastinf.errors import ConfigError, StoreMismatchError
from fastinf.retrieval.index import Index, open_index
from fastinf.retrieval.results import SearchResult

__all__ = ["search", "extract_queries"]


def search(index: Any, queries: Any, k: int = 100, *, store: Any = None, factors: Any = None,
           **kwargs: Any) -> SearchResult:
    """Search ``index`` (an :class:`Index` or its directory) with ``queries``.

    ``queries``: a test GradientStore or its directory, ``{unit: [M, k]}`` arrays, or a dataset file of new
    texts (``.tsv``/``.csv``/``.jsonl``/``.parquet`` as read by ``fastinf.data``), which is extracted on the
    fly with the model recorded in the train store's manifest (``factors``: the factor directory of a pca /
    pcamix / kfac store, default the one the index was built with). Other keyword arguments: :meth:`Index.search`.
    """
    idx = index if isinstance(index, Index) else open_index(index, store)
    if isinstance(queries, (str, os.PathLike)) and Path(queries).is_file():
        with tempfile.TemporaryDirectory(prefix="fastinf-queries-") as tmp:
            qstore = extract_queries(idx, queries, Path(tmp) / "queries", factors=factors)
            return idx.search(qstore, k, **kwargs)
    return idx.search(queries, k, **kwargs)


def extract_queries(index: Index, path: str | os.PathLike, out: str | os.PathLike, *,
                    batch_size: int = 16, device: Any = None, factors: Any = None) -> Any:
    """Extract a query store for the texts in ``path`` with the train store's model, units and projection.

    The model is loaded from ``identity.model.name`` of the train store's manifest (a hub name or local
    directory recorded at extraction); its fingerprint must equal the train store's, so features are
    comparable. A pca / pcamix / kfac store (kfac / ekfac indexes) needs its factor set: ``factors`` or the
    directory given to ``build_index(factors=...)``; its fingerprint must be the store's. Returns the opened
    query GradientStore.
    """
    from fastinf.extraction.extract import extract
    from fastinf.extraction.models import load_model
    from fastinf.extraction.projection_spec import CURVATURE_KINDS, store_spec

    ident = index.store.identity
    model_name = ident.get("model", {}).get("name")
    if not model_name:
        raise ConfigError(f"train store {index.store.path} does not record its model name, so new texts cannot be "
                          "extracted on the fly; extract the queries with `fastinf extract` and pass the store")
    task = ident.get("task", "seq-cls")
    proj = ident.get("projection", {})
    if proj.get("kind") not in ("kron", "exact") + CURVATURE_KINDS:
        raise ConfigError(f"train store {index.store.path} has projection {proj}; only kron/exact/pca/pcamix/kfac "
                          "stores can extract new queries")
    if proj.get("kind") in CURVATURE_KINDS and factors is None:
        factors = index.manifest.build.get("factors")
    spec = store_spec(index.store, factors)     # pca / kfac: the factor set, checked by fingerprint
    num_labels = None
    logits = index.store.meta.logits
    if task == "seq-cls" and logits is not None:
        num_labels = int(np.asarray(logits).shape[1])
    try:
        model, tokenizer = load_model(model_name, task=task, num_labels=num_labels)
    except ConfigError as e:
        raise ConfigError(f"new texts are extracted with the train store's model {model_name!r} (recorded in "
                          f"{index.store.path}/manifest.json), which could not be loaded: {e} Extract the queries "
                          "with `fastinf extract` and pass the query store instead") from e
    units = list(dict.fromkeys(u for g in index.groups for u in g.units))
    qstore = extract(model, tokenizer, str(path), out, layers=[_exact_selector(u) for u in units], proj=spec,
                     task=task, dtype=index.store.dtype, batch_size=batch_size,
                     max_length=int(ident.get("max_length", 128)), device=device, progress=False,
                     model_name=model_name)
    if qstore.identity["model"]["fingerprint"] != ident["model"]["fingerprint"]:
        raise StoreMismatchError(
            f"model {model_name!r} loaded now has fingerprint {qstore.identity['model']['fingerprint']}, the train "
            f"store was extracted with {ident['model']['fingerprint']}: the checkpoint changed; re-extract the "
            "train store or point the manifest's model name at the original checkpoint")
    return qstore


def _exact_selector(unit_name: str) -> str:
    """A selector term matching exactly one unit name (a regex anchored at both ends)."""
    return f"re:^{re.escape(unit_name)}$"
