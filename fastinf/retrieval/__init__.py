"""Retrieval: FAISS (or exact) indexes over store features and train-test search.

``index`` is the opened :class:`Index` (query vectors, candidates, exact re-rank, ``Index.search``) and
``open_index``; ``build`` is ``build_index`` (resumable per-unit or per-group builds) with ``build_dir``
(directory lock, overwrite/resume rules, crash-safe writes); ``search`` is the ``search`` facade (also for
files of new texts, extracted on the fly). ``groups`` resolves unit groups, ``features`` holds the train
side ``GroupFeatures``, ``queries`` the query inputs, ``precond`` the query-side preconditioners and their
fingerprints. ``index_store`` is the index directory's manifest; ``backends`` wraps FAISS CPU/GPU and the
exact blocked backend; ``results`` is ``SearchResult``; ``query_aggregate`` runs Rank/Vote/Mean at query
time on the union of candidates. Read ``index.py`` first (its docstring is the overview), then ``build.py``.
"""
