"""Search backends for retrieval: FAISS inner-product indexes and exact blocked matmul top-k.

- ``faiss``: any ``index_factory`` string (``Flat``, ``IVF4096,Flat``, ``IVF4096,PQ32``, ``HNSW32,Flat``,
  ...) with the inner-product metric. GPU FAISS is used when the installed faiss has GPU support and a
  CUDA device is visible (``faiss_gpu_available``; ``FASTINF_FAISS_GPU=0`` forces CPU); otherwise CPU
  FAISS. Use it for millions of rows and many queries: IVF search touches ``nprobe/nlist`` of the data.
- ``exact``: blocked ``Q @ Bᵀ`` in torch with a running top-k merge, on a CUDA device when one is
  present (the "alternative backend" of the design) or on the CPU. No index file; every query reads all
  rows. It is the brute-force reference of the FAISS path and the baseline of ``bench/retrieval.py``.

Everything here works on plain float32 arrays; choosing rows, preconditioning and re-ranking live in
``fastinf.retrieval``.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fastinf.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

_LOSSY_CODES = ("PQ", "SQ", "LSH", "RQ", "LSQ", "RABITQ")


def faiss_module() -> ModuleType:
    """Import faiss, or raise BackendError saying how to install it."""
    try:
        import faiss  # noqa: PLC0415  (optional heavy import, loaded on first use)
    except ImportError as e:
        raise BackendError("the faiss backend needs the `faiss` package: `pip install faiss-cpu` (or faiss-gpu "
                           "for GPU search), or build the index with backend='exact'") from e
    return faiss


@functools.lru_cache(maxsize=1)
def faiss_gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a GPU (``FASTINF_FAISS_GPU=0`` disables)."""
    if os.environ.get("FASTINF_FAISS_GPU", "1") == "0":
        return False
    try:
        faiss = faiss_module()
    except BackendError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    return faiss_module().StandardGpuResources()


def is_lossy(factory: str) -> bool:
    """Whether the factory's stored codes are compressed (PQ/SQ/...), so returned scores are approximate."""
    up = factory.upper()
    return any(code in up for code in _LOSSY_CODES)


def make_index(dim: int, factory: str) -> Any:
    """A fresh, untrained CPU FAISS inner-product index; FAISS's own parse errors become ConfigError."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"FAISS cannot build the index_factory string {factory!r} for {dim}-dim inner-product features: "
            f"{_faiss_message(e)}. Use a string such as 'Flat', 'IVF4096,Flat', 'IVF4096,PQ32' (the PQ code "
            f"count must divide the dim) or 'HNSW32,Flat'") from e


def _faiss_message(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def nlist(index: Any) -> int | None:
    """Number of inverted lists of an IVF index (None if the index has no IVF stage)."""
    ivf = _ivf(index)
    return None if ivf is None else int(ivf.nlist)


def _ivf(index: Any) -> Any:
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def default_nprobe(n_lists: int | None) -> int | None:
    """``max(8, nlist/64)`` probes: recall@100 >= 0.998 on the clustered 1M-row benchmark (bench/retrieval.py,
    where nlist/128 already gives 0.997); raise it for features with weaker cluster structure."""
    if n_lists is None:
        return None
    return int(min(n_lists, max(8, n_lists // 64)))


def set_nprobe(index: Any, nprobe: int | None) -> None:
    """Set the IVF probe count (ignored for indexes without IVF stage)."""
    if nprobe is None:
        return
    if nprobe <= 0:
        raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    elif hasattr(index, "nprobe"):  # GPU IVF indexes are not reachable through extract_index_ivf
        index.nprobe = int(min(nprobe, getattr(index, "nlist", nprobe)))


def populate(index: Any, training_rows: Callable[[], np.ndarray], blocks: Iterable[tuple[int, np.ndarray]],
             factory: str) -> Any:
    """Train ``index`` if it needs it (IVF centroids, PQ codebooks) and add every block; return the CPU index.

    ``training_rows`` is only called for indexes that need training. On GPU FAISS the work runs on the GPU
    (IVF k-means and assignment dominate build time) and the result is copied back for saving.
    """
    target = _maybe_gpu(index)
    if not target.is_trained:
        x = np.ascontiguousarray(training_rows(), dtype=np.float32)
        try:
            target.train(x)
        except RuntimeError as e:
            n_lists = nlist(index)
            hint = (f" An IVF index with {n_lists} lists needs at least {n_lists} (ideally 39x that) training "
                    f"rows; use fewer lists, e.g. 'IVF{max(1, int(np.sqrt(len(x))))},Flat', or 'Flat'"
                    if n_lists is not None and len(x) < n_lists else "")
            raise ConfigError(f"FAISS could not train {factory!r} on {len(x)} rows of dim {x.shape[1]}: "
                              f"{_faiss_message(e)}.{hint}") from e
    for _, block in blocks:
        target.add(np.ascontiguousarray(block, dtype=np.float32))
    return index if target is index else faiss_module().index_gpu_to_cpu(target)


def _maybe_gpu(index: Any) -> Any:
    """A GPU copy of ``index`` when GPU FAISS is available and implements its type, else ``index``."""
    if not faiss_gpu_available():
        return index
    faiss = faiss_module()
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    except RuntimeError as e:  # an index type without a GPU implementation (e.g. HNSW)
        log.info("using CPU FAISS for %s: %s", type(index).__name__, _faiss_message(e))
        return index


def for_search(index: Any) -> Any:
    """The index to search with: a GPU copy when GPU FAISS is available (and supports it), else itself."""
    return _maybe_gpu(index)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products: (scores [M, k] float32, rows [M, k] int64; -1 where fewer were found)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.shape[1] != index.d:
        raise ConfigError(f"queries have {q.shape[1]} features but the index holds {index.d}-dim vectors")
    scores, rows = index.search(q, int(k))
    return scores, rows.astype(np.int64, copy=False)


def write(index: Any, path: str) -> None:
    faiss_module().write_index(index, path)


def read(path: str) -> Any:
    faiss = faiss_module()
    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise BackendError(f"FAISS could not read {path}: {_faiss_message(e)}; rebuild the index") from e


# ---------------------------------------------------------------------------------------------- exact
def exact_device() -> torch.device:
    """CUDA when present (the fast exact backend), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def exact_topk(queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int,
               device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries @ Xᵀ`` where X arrives as ``(row0, float32 [b, D])`` blocks.

    Memory is O(M·(k + b)) on ``device``: each block's scores are merged into a running top-k, so N can
    be any size. Returns (scores [M, k'] float32, rows [M, k'] int64) best-first, with k' = min(k, N).
    """
    dev = torch.device(device) if device is not None else exact_device()
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=dev)  # (M, D)
    m = q.shape[0]
    best_s = torch.empty((m, 0), dtype=torch.float32, device=dev)
    best_i = torch.empty((m, 0), dtype=torch.int64, device=dev)
    for row0, block in blocks:
        b = torch.as_tensor(np.ascontiguousarray(block, dtype=np.float32), device=dev)  # (b, D)
        if b.shape[1] != q.shape[1]:
            raise ConfigError(f"queries have {q.shape[1]} features but the train rows have {b.shape[1]}")
        s = q @ b.T  # (M, b)
        blk = torch.topk(s, min(k, s.shape[1]), dim=1, sorted=False)  # the block's own top-k first
        cat_s = torch.cat([best_s, blk.values], dim=1)  # (M, <= 2k)
        cat_i = torch.cat([best_i, blk.indices + row0], dim=1)
        top = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1, sorted=True)
        best_s, best_i = top.values, torch.gather(cat_i, 1, top.indices)
    return best_s.cpu().numpy(), best_i.cpu().numpy()
