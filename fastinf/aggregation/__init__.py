"""Stage 3, aggregation and evaluation: per-unit scores -> one score per train sample -> NDR.

``aggregate`` folds units and test samples (mean, rank, vote, median, min_rank, rrf, zmean; unit groups by
selector) in one streaming pass, reading scores through ``sources`` into the per-atom sums of
``accumulators``, with the C++ ranker behind ``_native``; ``parquet`` writes and reads the aggregated
scores; ``evaluate`` computes the noise detection rate (NDR curve, NDR@p, AUC_NDR), ROC-AUC/AP,
bootstrap CIs, cancellation ratios and the per-layer table. Read ``aggregate.py`` first.
"""
