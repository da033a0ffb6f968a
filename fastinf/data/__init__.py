"""Data in: datasets and label noise.

``datasets`` turns local files (csv/tsv/jsonl/json/parquet, GLUE TSV), Hub names, Hugging Face datasets and
the packaged SMS set into a ``TextDataset``; ``noise`` injects seeded label noise (uniform or
class-conditional) and records the mask that NDR is evaluated against. Read ``datasets.py`` first.
"""
from fastinf.data.datasets import (  # noqa: F401
    TextDataset, as_text_dataset, from_hf, load_dataset_spec, load_sms, sms_spam_path,
)
from fastinf.data.noise import NoiseResult, inject_noise, load_noise  # noqa: F401
