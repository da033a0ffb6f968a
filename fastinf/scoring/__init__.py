"""Stage 2, scoring: per-unit test x train influence.

``curvature`` fits preconditioners (identity, damped Gauss-Newton inverse exact or low-rank, DataInf,
LiSSA) from a store; ``estimators`` holds ``score()`` and every estimator (graddot, gradcos, tracin, if,
datainf, lissa, selfinf, loss, repsim, tracin_we); ``scores`` is the memory-mapped per-unit ``ScoreSet``;
``dist_score`` shards scoring over torchrun ranks, resumably. Read ``estimators.py`` first.
"""
