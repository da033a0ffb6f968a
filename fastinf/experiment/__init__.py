"""Experiments: the paper's protocol as one staged, cached command (``fastinf run``).

``config`` is the typed, validated ``RunConfig`` (YAML in and out; the generic dataclass <-> dict
conversion and ``config_hash`` are ``config_io``); ``train`` fine-tunes (full or LoRA) with per-epoch
checkpoints; ``pipeline`` runs noise -> train -> extract -> score -> aggregate -> evaluate
(-> filter-and-retrain) per seed and assembles the results. The stages of one seed are ``seed_stages``,
their cache markers ``stages``; ``splits`` loads the data, ``groups`` builds and evaluates the unit
groups, ``metrics`` scores one ranking, ``costs`` times each group's extraction, ``retrain`` is
filter-and-retrain. ``report`` writes the md/HTML report from ``summary`` (mean ± std, the layer
recommendation), ``plots`` and ``report_tables``.
Read ``pipeline.py`` first, then ``seed_stages.py``.
"""
