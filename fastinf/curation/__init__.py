"""Curation: which training samples to drop or check, from their influence on a reference set.

Read ``curate.py`` first (the steps of :func:`fastinf.curate`), then ``stages.py`` (what is cached and
resumed), ``scoring.py`` (the fused pass and per-test explanations), ``table.py`` (the results table and
the datasets written back in the input's format) and ``report.py`` (the markdown / HTML report).
"""
