"""The GradientStore: the on-disk format of extracted features, and its reader and writer.

Chunked, checksummed, memory-mapped ``N x k`` arrays per unit plus per-sample metadata, written crash-safely
(per-rank progress logs, a writer lock, atomic JSON) and verified on read. Read ``gradient_store.py`` first.
"""
from fastinf.store.gradient_store import (  # noqa: F401
    GradientStore, StoreMeta, StoreWriter, WriterLock, atomic_write_json, canonical_dtype, fsync_dir,
    read_progress_records,
)
