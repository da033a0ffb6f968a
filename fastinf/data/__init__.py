"""Data in and out: datasets, tables and label noise.

``datasets`` turns local files (csv/tsv/jsonl/json, GLUE TSV), Hub names and Python rows into a ``TextDataset``
and Arrow-shaped sources (Parquet, Arrow files, ``save_to_disk`` folders, HF datasets, pyarrow tables) into a
lazy ``ArrowTextDataset`` (``lazy``, ``sources``, ``arrow_rows``); ``tables`` writes a source back in its own
format with rows removed or annotated (``write_like``) and results out (``results_table``); ``noise`` injects
seeded label noise (uniform or class-conditional) and records the mask that NDR is evaluated against.
Read ``datasets.py`` first, then ``tables.py``.
"""
from fastinf.data.datasets import (  # noqa: F401
    ArrowTextDataset, TextDataset, as_text_dataset, from_hf, load_dataset_spec, load_sms, sms_spam_path,
)
from fastinf.data.noise import NoiseResult, inject_noise, load_noise  # noqa: F401
from fastinf.data.sources import open_arrow_dataset  # noqa: F401
from fastinf.data.tables import results_table, write_like  # noqa: F401
