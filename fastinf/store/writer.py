"""StoreWriter, the public writer of a GradientStore: the chunked writer plus ``finalize()``.

The writing itself (preallocation, chunked ``pwrite`` + fsync, progress logs, resume, ranks) is in
chunked.py; this class only adds the last step, sealing the store and handing back the opened reader.
"""
from __future__ import annotations

from fastinf.store.chunked import ChunkedStoreWriter
from fastinf.store.reader import GradientStore


class StoreWriter(ChunkedStoreWriter):
    """Crash-safe, resumable writer of a GradientStore (see chunked.py's module docstring).

    Args:
        path: store directory.
        identity: what makes two stores comparable: ``{"model": {...}, "projection": {...}, "task": ...,
            "dataset": {...}, ...}``; resuming or overwriting checks it.
        units: fastinf.units.Unit list (store order); ``feature_dims`` maps unit name -> k.
        n: number of samples. ``chunk_size``: rows per chunk (the unit of crash-safety and resume).
        dtype: feature storage dtype (fp16 | bf16 | fp32). ``n_classes``: store logits [N, C] if given.
        extras: optional arrays ``{name: (row_shape, numpy dtype)}``.
        resume: continue an incomplete store with the same identity instead of refusing.
        overwrite: replace the store in ``path`` — only one fastinf wrote (``STORE_KIND``: nothing foreign in
            the directory, else ConfigError naming it), and only after taking the store's lock.
        rank, world: this process's shard in a distributed run (chunks with ``chunk % world == rank``).
        barrier: callable synchronising ranks (distributed runs); None for one process.
    """

    def finalize(self) -> GradientStore:
        """Close this rank's files; on rank 0 (after all ranks are done) fold progress into the manifest.

        Returns the opened store (on every rank, after the final barrier).
        """
        self._seal()
        return GradientStore.open(self.path)

    def __enter__(self) -> "StoreWriter":
        return self
