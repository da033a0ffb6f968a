"""Retrieval: FAISS (or exact) indexes over store features and train-test search.

``index`` builds resumable per-unit or per-group indexes and searches them (proponents/opponents, exact
re-rank); ``index_store`` is the index directory's manifest; ``backends`` wraps FAISS CPU/GPU and the exact
blocked backend; ``results`` is ``SearchResult``; ``query_aggregate`` runs Rank/Vote/Mean at query time on
the union of candidates. Read ``index.py`` first.
"""
