"""Experiments: the paper's protocol as one staged, cached command (``fastinf run``).

``config`` is the typed, validated ``RunConfig`` (YAML in and out); ``train`` fine-tunes (full or LoRA) with
per-epoch checkpoints; ``pipeline`` runs noise -> train -> extract -> score -> aggregate -> evaluate
(-> filter-and-retrain) per seed, each stage cached; ``report`` writes the md/HTML report and plots.
Read ``pipeline.py`` first.
"""
