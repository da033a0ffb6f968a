"""Extraction: run the model over a dataset and write per-sample, per-unit projected gradients to a store.

``extract(model, tokenizer, dataset, out=...)`` ties the stages together: select units
(fastinf.units), build projectors (fastinf.projection), and for each chunk of rows tokenize batches, call
``fastinf.capture.features_for_batch`` (one forward, one backward to the unit outputs) and hand the
features to a crash-safe ``StoreWriter``. Resuming recomputes only unrecorded chunks; under ``torchrun``
each rank takes its own chunks (``chunk % world == rank``) and rank 0 finalises.

Within each chunk, rows are batched in order of token length and each batch is padded to its own longest
sequence (dynamic padding), so little compute goes to padding; a sample's features do not depend on its
batch-mates beyond floating-point rounding, and the order is deterministic (byte-identical resume).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from fastinf.data.datasets import TextDataset, as_text_dataset
from fastinf.errors import ConfigError, DataError
from fastinf.extraction.fingerprint import model_fingerprint  # noqa: F401 (re-exported: the store identity)
from fastinf.store import GradientStore, StoreWriter, canonical_dtype
from fastinf.store.claim import check_free_space, preflight_store

log = logging.getLogger(__name__)

# Largest automatic batch on CPU. Measured (bench/extract.py, MiniLM, T=32, 1 thread): batch 256 peaked at
# 2.6 GB RSS, 32 at 1.1 GB, with throughput within noise (length-sorted chunks pad ~3.5% at any batch size).
CPU_BATCH_CAP = 32


@dataclass
class ExtractStats:
    """Timing of one extraction (seconds), for reports and benchmarks."""

    samples: int = 0
    seconds: float = 0.0
    tokenize_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _dist_info(rank: int | None, world: int | None) -> tuple[int, int, Callable[[], None] | None]:
    """(rank, world, barrier) from arguments or an initialised torch.distributed process group."""
    import torch.distributed as dist

    if rank is not None or world is not None:
        return int(rank or 0), int(world or 1), (dist.barrier if dist.is_available() and dist.is_initialized() else None)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, None


def _tokenize(tokenizer: Any, ds: TextDataset, rows: np.ndarray, max_length: int,
              task_name: str) -> dict[str, torch.Tensor]:
    texts, pairs = ds.text_batch(rows)   # only this batch's strings (an ArrowTextDataset reads just these rows)
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if ds.labels is not None and task_name != "causal-lm":
        batch["labels"] = torch.as_tensor(ds.labels[rows], dtype=torch.long)
    return batch


def extract(model: torch.nn.Module, tokenizer: Any, dataset: Any, out: str | os.PathLike, *,
            layers: str | Sequence[str] | None = "all", proj: str | Any = "16x16", task: str | Any = "seq-cls",
            dtype: str = "fp16", batch_size: int | None = None, max_length: int = 128, seed: int = 0,
            resume: bool = False, overwrite: bool = False, chunk_size: int | None = None,
            token_grads: bool = False, device: str | torch.device | None = None, progress: bool = True,
            rank: int | None = None, world: int | None = None, stats: ExtractStats | None = None,
            model_name: str | None = None, reps: bool = False) -> GradientStore:
    """Extract per-sample projected gradients of the selected units into a GradientStore at ``out``.

    Args:
        model: an HF model (sequence classifier or causal LM; peft-wrapped is fine). Put in eval mode.
        tokenizer: its tokenizer (padding side and pad token set).
        dataset: TextDataset, a spec ("sms", a file path, "glue:sst2"), an HF dataset, or rows.
        layers: unit selector (see fastinf.units.select), e.g. "all", "middle,last", "attn.v".
        proj: "16x16" (Kronecker k_out x k_in), "exact", or a ProjectionSpec.
        task: "seq-cls", "causal-lm", or a fastinf.models Task (e.g. CustomLoss(fn)).
        dtype: storage dtype fp16 | bf16 | fp32 (accumulation is always fp32).
        batch_size: samples per forward/backward; None = the largest safe batch from fastinf.plan (or,
            when resuming, the batch of the interrupted run, so the result stays byte-identical).
        token_grads: also store token ids and per-position embedding output gradients (extras
            ``tokens`` [N, L] and ``embed_grads`` [N, L, d]) for tracin_we; needs the embedding unit.
        reps: also store the masked-mean hidden state of the embedding and every block (extra ``reps``
            [N, B + 1, d], fastinf.extraction.reps) for the RepSim baseline (``score(method='repsim')``).
        resume: continue an interrupted extraction in ``out`` (byte-identical result).
        rank, world: shard for distributed runs (default: from torch.distributed if initialised).
    Returns:
        The finished, opened GradientStore.
    """
    _check_sizes(max_length, batch_size, chunk_size)
    preflight_store(out, resume=resume, overwrite=overwrite)  # a foreign or file --out: refused before any work
    run = _prepare(model, tokenizer, dataset, out, layers=layers, proj=proj, task=task, dtype=dtype,
                   batch_size=batch_size, max_length=max_length, seed=seed, token_grads=token_grads, device=device, reps=reps)
    identity = _identity(run, model, model_name)
    rank_, world_, barrier = _dist_info(rank, world)
    chunk_size = chunk_size if chunk_size is not None else max(run.batch_size, min(4096, run.batch_size * 16))
    writer = StoreWriter(out, identity=identity, units=run.units, feature_dims=run.dims, n=run.n, dtype=run.dtype,
                         chunk_size=chunk_size, n_classes=run.n_classes, extras=run.extras, resume=resume,
                         overwrite=overwrite, rank=rank_, world=world_, barrier=barrier)
    stats = stats if stats is not None else ExtractStats()
    pending = writer.pending_chunks()
    bar = _progress_bar(sum(np.diff(writer.chunk_rows(c))[0] for c in pending),
                        f"extract {Path(out).name}" + (f" [rank {rank_}/{world_}]" if world_ > 1 else ""),
                        progress and rank_ == 0)
    t_start = time.perf_counter()
    try:
        for chunk in pending:
            _extract_chunk(run, model, tokenizer, writer, chunk, stats, bar)
        store = writer.finalize()
    except BaseException:
        writer.abort()  # quietly (the original error surfaces); a store this call made and never filled goes
        raise
    finally:
        bar.close()
    stats.seconds += time.perf_counter() - t_start
    if store.nonfinite and rank_ == 0:
        _warn_nonfinite(store)
    return store


@dataclass
class _Run:
    """The resolved inputs of one extraction: dataset, task, device, units, projectors and sizes."""

    ds: TextDataset
    n: int
    task_obj: Any
    task_name: str
    n_classes: int | None
    device: torch.device
    units: list[Any]
    emb: Any
    spec: Any
    dtype: str
    max_length: int
    batch_size: int
    projectors: dict[str, Any]
    dims: dict[str, int]
    extras: dict[str, tuple]
    token_grads: bool
    reps: tuple[int, int] | None = None   # (B + 1, d) when hidden representations are stored


def _check_sizes(max_length: int, batch_size: int | None, chunk_size: int | None = None) -> None:
    """Reject a non-positive ``max_length``, ``batch_size`` or ``chunk_size`` (never a silent default)."""
    if max_length <= 0:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
                                   or chunk_size <= 0):
        raise ConfigError(f"chunk_size must be a positive integer (rows per crash-safe chunk), got {chunk_size!r}")


def _prepare(model: torch.nn.Module, tokenizer: Any, dataset: Any, out: str | os.PathLike | None, *, layers: Any,
             proj: Any, task: Any, dtype: str, batch_size: int | None, max_length: int, seed: int,
             token_grads: bool, device: Any, reps: bool = False) -> _Run:
    """Resolve the arguments of :func:`extract`: dataset and task, device and units, length, batch, projectors.

    ``out`` None: no store is written (score-while-extracting): no free-space check, no earlier batch size."""
    from fastinf.extraction.models import make_task
    from fastinf.extraction.plan import auto_batch_size
    from fastinf.extraction.sizes import store_bytes
    from fastinf.extraction.reps import reps_shape
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector, check_fits, feature_dim

    dtype = canonical_dtype(dtype)
    spec = ProjectionSpec.parse(proj, seed=seed) if isinstance(proj, str) else proj
    task_obj = make_task(task)
    task_name = getattr(task_obj, "name", str(task))
    ds, n_classes = _dataset_for(model, tokenizer, dataset, task_name)
    device, units = _units_on_device(model, layers, token_grads, device)
    check_fits(units, spec)  # an oversized --proj is refused before any matrix or file is allocated
    max_length = _capped_max_length(model, max_length)
    dims = {u.name: feature_dim(u, spec) for u in units}
    emb = next((u for u in units if u.kind == "embedding"), None)
    extras = {}
    if token_grads:
        extras = {"tokens": ((max_length,), "int32"), "embed_grads": ((max_length, emb.d_out), "float32")}
    reps_dims = reps_shape(model) if reps else None
    if reps_dims is not None:
        extras["reps"] = (reps_dims, "float32")
    if out is not None and not (Path(out) / "manifest.json").exists():  # a new store must fit on disk first
        check_free_space(Path(out), store_bytes(len(ds), dims, dtype, n_classes, extras))
    if batch_size is None:  # the batch of an interrupted run (byte-identical resume), else the plan's
        batch_size = (_previous_batch_size(out) if out is not None else None) or auto_batch_size(
            model, units, spec, max_length=max_length, dtype=dtype, task=task_obj, n=len(ds),
            cap=CPU_BATCH_CAP if device.type == "cpu" else 256)
    projectors = {u.name: UnitProjector(u, spec, device=device) for u in units}
    return _Run(ds=ds, n=len(ds), task_obj=task_obj, task_name=task_name, n_classes=n_classes, device=device,
                units=units, emb=emb, spec=spec, dtype=dtype, max_length=max_length, batch_size=batch_size,
                projectors=projectors, dims=dims, extras=extras, token_grads=token_grads, reps=reps_dims)


def _dataset_for(model: torch.nn.Module, tokenizer: Any, dataset: Any, task_name: str
                 ) -> tuple[TextDataset, int | None]:
    """The TextDataset and the model's class count; labels must fit the classes, the tokenizer must pad."""
    ds = as_text_dataset(dataset, need_labels=task_name != "causal-lm")
    n_classes = _num_labels(model) if task_name == "seq-cls" else None
    if n_classes is not None and ds.labels is not None:
        bad = np.flatnonzero((ds.labels < 0) | (ds.labels >= n_classes))
        if bad.size:
            raise DataError(f"labels outside the model's {n_classes} classes at rows {bad[:8].tolist()} "
                            f"(values {np.unique(ds.labels[bad])[:8].tolist()}); fix the labels or load the "
                            f"model with num_labels={int(ds.labels.max()) + 1}")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return ds, n_classes


def _units_on_device(model: torch.nn.Module, layers: Any, token_grads: bool, device: Any
                     ) -> tuple[torch.device, list[Any]]:
    """Move the model to its device in eval mode and select its units (with the embedding for token_grads)."""
    from fastinf.extraction.units import discover, select

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    model.eval()
    all_units = discover(model)
    units = select(all_units, layers)
    if token_grads and not any(u.kind == "embedding" for u in units):
        raise ConfigError("token_grads=True needs the input embedding unit in the selection (add 'first')")
    return device, units


def _capped_max_length(model: torch.nn.Module, max_length: int) -> int:
    """``max_length``, capped at the model's positions when it has fewer."""
    from fastinf.extraction.probe import model_max_positions

    positions = model_max_positions(model)
    if positions is not None and max_length > positions:
        log.info("max_length %d exceeds the model's %d positions; using %d", max_length, positions, positions)
        max_length = positions
    return max_length


def _identity(run: _Run, model: torch.nn.Module, model_name: str | None) -> dict:
    """The store identity: model fingerprint, projection, task, sizes and dataset fingerprint."""
    spec = run.spec
    model_id = {**model_fingerprint(model), **({"name": model_name} if model_name else {})}
    head = getattr(getattr(model, "config", None), "fastinf_head", None)
    if head:  # a newly initialised, seeded head (informational: the fingerprint hashes its weights)
        model_id["head"] = json.loads(json.dumps(head, sort_keys=True, default=str))
    return {
        "model": model_id,
        "projection": spec.identity(model_id),   # factors of another model are refused here
        "task": run.task_name,
        "max_length": int(run.max_length),
        "batch_size": int(run.batch_size),
        "dataset": {"name": run.ds.name, "fingerprint": run.ds.fingerprint(), "n": run.n,
                    **({"label_names": list(run.ds.label_names)} if run.ds.label_names else {})},
    }


def _extract_chunk(run: _Run, model: torch.nn.Module, tokenizer: Any, writer: StoreWriter, chunk: int,
                   stats: ExtractStats, bar: Any) -> None:
    """Compute one chunk's rows batch by batch (length-sorted) and write them back in store order."""
    a, b = writer.chunk_rows(chunk)
    feats, meta, ext = collect_chunk(chunk_batches(run, model, tokenizer, a, b, stats, bar), a)
    t3 = time.perf_counter()
    writer.write_chunk(chunk, feats, meta, ext)
    stats.write_s += time.perf_counter() - t3
    stats.samples += b - a


def chunk_batches(run: _Run, model: torch.nn.Module, tokenizer: Any, a: int, b: int, stats: ExtractStats,
                  bar: Any) -> Iterator[tuple[np.ndarray, dict, dict, dict]]:
    """``(rows, features, meta, extras)`` per batch of dataset rows ``a..b-1``, in order of token length.

    Batches of similar length (sorted within the chunk) waste little compute on padding; a sample's
    features do not depend on its batch-mates, and the order is deterministic. ``features`` maps unit
    name -> float32 [B, k], ``meta`` field -> [B, ...] (store fields), ``extras`` name -> [B, ...].
    Used by :func:`extract` (via :func:`collect_chunk`) and by score-while-extracting.
    """
    order = _length_sorted_rows(tokenizer, run.ds, a, b, run.max_length)
    for s in range(0, b - a, run.batch_size):
        rows = order[s:s + run.batch_size]
        feats, meta, ext = _extract_batch(run, model, tokenizer, rows, stats)
        bar.update(len(rows))
        yield rows, feats, meta, ext


def collect_chunk(batches: Iterator[tuple[np.ndarray, dict, dict, dict]], a: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The batches of one chunk starting at row ``a``, concatenated back into store (row) order."""
    rows, parts = [], ([], [], [])
    for r, *outs in batches:
        rows.append(r)
        for acc, out in zip(parts, outs):
            acc.append(out)
    back = np.argsort(np.concatenate(rows) - a, kind="stable")
    return tuple({k: np.concatenate([p[k] for p in acc])[back] for k in (acc[0] if acc else {})}
                 for acc in parts)  # type: ignore[return-value]


def _extract_batch(run: _Run, model: torch.nn.Module, tokenizer: Any, rows: np.ndarray, stats: ExtractStats
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tokenize and capture one batch of ``rows``: its features, metadata and extras."""
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.reps import batch_reps

    ds, emb = run.ds, run.emb
    t0 = time.perf_counter()
    batch = {k: v.to(run.device) for k, v in _tokenize(tokenizer, ds, rows, run.max_length, run.task_name).items()}
    t1 = time.perf_counter()
    res = features_for_batch(model, run.units, run.projectors, batch, run.task_obj, check_finite=False,
                             raw_units={emb.name} if run.token_grads else None)
    feats = {u.name: res.features[u.name].detach().float().cpu().numpy() for u in run.units}
    t2 = time.perf_counter()
    meta = {"ids": ds.ids[rows], "label": ds.labels[rows] if ds.labels is not None else np.full(len(rows), -1),
            "loss": res.loss.detach().float().cpu().numpy(), "pred": _np(res.pred, len(rows), -1),
            "correct": _np(res.correct, len(rows), False)}
    if run.n_classes:
        meta["logits"] = res.logits.detach().float().cpu().numpy()
    ext = {}
    if run.token_grads:
        ext["tokens"], ext["embed_grads"] = _token_grad_rows(batch, res.raw[emb.name], run.max_length)
    if run.reps is not None:
        ext["reps"] = batch_reps(model, batch, run.reps)
    stats.tokenize_s += t1 - t0
    stats.compute_s += t2 - t1
    return feats, meta, ext


def _warn_nonfinite(store: GradientStore) -> None:
    """Log the samples whose gradients hold NaN/inf (scoring refuses them unless told to drop them)."""
    ids = [d["id"] for d in store.nonfinite[:10]]
    log.warning("%d samples have NaN/inf gradients (ids %s%s); scoring refuses them unless told to drop them",
                len(store.nonfinite), ids, " ..." if len(store.nonfinite) > 10 else "")


def _length_sorted_rows(tokenizer: Any, ds: TextDataset, a: int, b: int, max_length: int) -> np.ndarray:
    """Rows a..b-1 ordered by tokenized length (stable), so that batches pad little."""
    texts, pairs = ds.text_range(a, b)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    lengths = np.array([len(x) for x in enc["input_ids"]])
    return a + np.argsort(lengths, kind="stable")


def _previous_batch_size(out: str | os.PathLike) -> int | None:
    """Batch size recorded by an earlier (possibly interrupted) extraction into ``out``, if any."""
    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        return int(manifest["identity"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _np(t: torch.Tensor | None, n: int, fill: Any) -> np.ndarray:
    if t is None:
        return np.full(n, fill)
    return t.detach().cpu().numpy()


def _token_grad_rows(batch: dict[str, torch.Tensor], raw: tuple[torch.Tensor, torch.Tensor],
                     max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, L] (-1 = padding) and embedding output gradients [B, L, d], padded to max_length."""
    ids, g = raw
    mask = batch.get("attention_mask")
    ids = ids.detach().cpu().long()
    g = g.detach().float().cpu()
    B, T = ids.shape
    out_ids = np.full((B, max_length), -1, dtype=np.int32)
    out_g = np.zeros((B, max_length, g.shape[-1]), dtype=np.float32)
    keep = mask.cpu().bool() if mask is not None else torch.ones(B, T, dtype=torch.bool)
    masked_ids = torch.where(keep, ids, torch.full_like(ids, -1))
    out_ids[:, :T] = masked_ids.numpy()
    out_g[:, :T] = (g * keep.unsqueeze(-1)).numpy()
    return out_ids, out_g


def _num_labels(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_labels", None)
    return int(n) if n else None


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NullBar()
    return tqdm(total=int(total), desc=desc, unit="sample", dynamic_ncols=True, leave=False)


def write_run_config(out: str | os.PathLike, args: dict) -> None:
    """Write the replayable command configuration next to a store (``extract_config.json``)."""
    p = Path(out) / "extract_config.json"
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # a store entry (STORE_KIND) until renamed
    tmp.write_text(json.dumps(args, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, p)
