"""Stage 2, scoring: per-unit test x train influence.

``estimators`` holds ``score()`` (the entry point: checks, plan, writer, one scoring loop per method);
its pieces are ``planning`` (runs, block sizes), ``setups`` (per-method units and kept rows),
``pairwise`` (the GEMM estimators graddot, gradcos, tracin, if, datainf, lissa, selfinf, repsim, and
``score_arrays``) and ``tracin_we`` (token rows and TracIn-WE). ``curvature`` fits preconditioners
(identity, damped Gauss-Newton inverse exact or low-rank, DataInf, LiSSA) from a store and caches them;
the fitted classes are in ``preconditioners``, the train-feature streams in ``sources``, ``Damping`` in
``damping``. ``scores`` is the memory-mapped per-unit ``ScoreSet``; ``dist_score`` shards scoring over
torchrun ranks, resumably, with its files (manifest, progress logs, column writes) in ``dist_output``.
Read ``estimators.py`` first.
"""
