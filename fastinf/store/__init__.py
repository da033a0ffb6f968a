"""The GradientStore: the on-disk format of extracted features, and its reader and writer.

Chunked, checksummed, memory-mapped ``N x k`` arrays per unit plus per-sample metadata, written crash-safely
(per-rank progress logs, a writer lock, atomic JSON) and verified on read. Read ``format.py`` first (the
directory layout and dtypes), then ``reader.py`` (GradientStore) and ``chunked.py`` (the crash-safe chunked
writing; ``writer.py``'s StoreWriter adds ``finalize``). ``durable.py`` holds the atomic-write, fsync,
checksum and progress-log helpers that other stages reuse, ``lock.py`` the WriterLock, ``ownership.py``
what fastinf may delete on ``--overwrite``, ``claim.py`` how a writer claims its directory (checks before
work, the lock before any removal, cleanup of a failed creation) and ``integrity.py`` the manifest and
``.npy`` header checks of every open.
"""
from fastinf.store.durable import (
    atomic_write_json, fsync_dir, read_progress_records, storage_error,
)
from fastinf.store.format import canonical_dtype, from_storage, to_storage
from fastinf.store.lock import WriterLock
from fastinf.store.reader import GradientStore, StoreMeta
from fastinf.store.writer import StoreWriter

__all__ = ["GradientStore", "StoreMeta", "StoreWriter", "WriterLock", "atomic_write_json", "canonical_dtype",
           "fsync_dir", "from_storage", "read_progress_records", "storage_error", "to_storage"]
