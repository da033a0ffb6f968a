"""Stage 1, extraction: model -> per-sample, per-unit projected gradient features.

``units`` discovers a model's linear/embedding/LoRA units and parses layer selectors; ``models`` loads a
model with its tokenizer and defines the per-sample loss (``Task``), ``packaged`` locates the packaged
models and ``checkpoint`` rebuilds ``fastinf train`` checkpoints; ``projection`` holds the Kronecker /
exact feature maps; ``capture`` computes every unit's features from one forward and one backward;
``extract`` streams a dataset through capture into a ``GradientStore``; ``plan`` sizes batches and blocks
for a memory budget, from the byte formulas of ``sizes`` and the activations measured by ``probe``.
Read ``extract.py`` first, then ``capture.py``.
"""
