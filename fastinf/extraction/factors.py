"""The factor pass: one streaming pass over (a sample of) the train set that fits K-FAC factors per unit.

``fit_factors(model, tokenizer, data, out=...)`` runs the model batch by batch (the same capture as
extraction: one forward, one ``autograd.grad`` of the summed per-sample loss to the unit outputs, raw
``(x, g)`` kept) and accumulates per unit, over non-padding tokens (each batch's products in the capture's
precision - float32, or float64 for float64 models - summed across batches and chunks in float64):

* ``Σ x̃ x̃ᵀ`` with ``x̃ = [x, 1]`` for units with a bias (embedding: token counts, the diagonal of a
  one-hot input's covariance), divided by the tokens seen: ``A``;
* ``Σ g gᵀ`` of the output gradients (padding rows are zero), divided by the samples seen: ``S``
  (``A ⊗ S`` then approximates the empirical Fisher of per-sample gradients ``Σ_t g_t x̃_tᵀ``).

LoRA units (``lora_a`` / ``lora_b``) and heads are linear layers and get the same factors; a module that runs
more than once per forward (shared weights) is refused. The result is a factor directory
(``fastinf.extraction.factors_format``) used by the ``pca`` / ``pcamix`` / ``kfac`` projections.

Resumable: rows are processed in chunks (``chunk_size`` rows, length-sorted into batches); after each chunk the
rank's running sums are replaced atomically, so a killed pass resumes after its last finished chunk and
ends with identical factors. Under ``torchrun`` rank r takes chunks ``c % world == r`` and writes its own
state file; rank 0 adds the states in rank order (a shared filesystem, as for extraction).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastinf.errors import ConfigError, StoreError
from fastinf.extraction.factors_format import (
    FACTORS_KIND,
    FORMAT,
    VERSION,
    Factors,
    eigh_desc,
    fingerprint_of,
    load_state,
    read_manifest,
    save_state,
    write_manifest,
    write_unit,
)
from fastinf.extraction.units import Unit, get_module
from fastinf.store.ownership import describe_entries, make_output_dir, remove_own_artifact

__all__ = ["fit_factors", "batch_sums"]


@dataclass
class _Run:
    """The resolved inputs of one factor pass."""

    ds: Any
    rows: np.ndarray
    task: Any
    task_name: str
    units: list[Unit]
    projectors: dict[str, Any]
    pads: dict[str, int | None]
    device: torch.device
    max_length: int
    batch_size: int
    chunk_size: int

    @property
    def n_chunks(self) -> int:
        return -(-len(self.rows) // self.chunk_size)


def fit_factors(model: torch.nn.Module, tokenizer: Any, data: Any, out: str | os.PathLike, *,
                layers: str | Sequence[str] | None = "all", task: str | Any = "seq-cls", max_length: int = 128,
                batch_size: int = 16, max_samples: int | None = None, sample_seed: int = 0,
                chunk_size: int = 1024, resume: bool = False, overwrite: bool = False, device: Any = None,
                rank: int | None = None, world: int | None = None, progress: bool = True,
                model_name: str | None = None) -> Factors | None:
    """Fit per-unit K-FAC factors ``A``, ``S`` (and their eigenbases) on ``data`` into the directory ``out``.

    Args:
        model, tokenizer, data, layers, task, max_length: as for :func:`fastinf.extract` (use the train set).
        batch_size: samples per forward/backward. chunk_size: rows per crash-safe chunk.
        max_samples: fit on a seeded random sample (``sample_seed``) of this many rows instead of all.
        resume: continue an interrupted pass in ``out``; overwrite: replace a factor set fastinf wrote there.
        rank, world: shard of a distributed pass (default: from torch.distributed if initialised).
    Returns:
        The opened :class:`Factors` (``None`` on a rank > 0 of a pass whose other ranks are not done yet).
    """
    from fastinf.extraction.extract import _dist_info

    for name, v in (("max_length", max_length), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues an interrupted factor pass, "
                          "overwrite discards it; pass one of them")
    _preflight(Path(out), overwrite)
    run = _prepare(model, tokenizer, data, layers, task, max_length, batch_size, chunk_size, device, max_samples,
                   sample_seed)
    identity = _identity(run, model, model_name)
    rank_, world_, barrier = _dist_info(rank, world)
    # rank 0 claims (or clears) the output first; the other ranks then join the unfinished pass it started
    # (explicit rank/world without a process group: ranks run in any order and join each other's pass)
    join = resume or (world_ > 1 and barrier is None)
    done_already = _open_output(Path(out), identity, run, resume=join, overwrite=overwrite) if rank_ == 0 else None
    if barrier is not None:
        barrier()
    if rank_ != 0:
        done_already = _open_output(Path(out), identity, run, resume=True, overwrite=False)
    if done_already is not None:
        return done_already
    _run_chunks(run, model, tokenizer, Path(out), rank_, world_, progress)
    if barrier is not None:
        barrier()
    # rank 0 reduces after the barrier; without a process group (explicit rank/world) whichever rank finds
    # every chunk done does
    result = _finalize(Path(out), run, world_) if rank_ == 0 or barrier is None else None
    if barrier is not None:
        barrier()
        result = Factors.open(out)
    return result


def _preflight(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory that holds no factor set, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the factors output must be a directory — choose another path")
    entries = [e.name for e in out.iterdir()] if out.is_dir() else []
    if entries and read_manifest(out) is None:
        raise ConfigError(f"{out} is not empty and holds no factor set ({describe_entries(entries)}); choose an "
                          "empty or new output directory")
    if overwrite and entries:
        from fastinf.store.ownership import check_removable

        check_removable(out, FACTORS_KIND)


def _prepare(model: torch.nn.Module, tokenizer: Any, data: Any, layers: Any, task: Any, max_length: int,
             batch_size: int, chunk_size: int, device: Any, max_samples: int | None, sample_seed: int) -> _Run:
    """Resolve dataset, task, units (each with a 1x1 projector: capture needs one), padding ids and rows."""
    from fastinf.extraction.extract import _capped_max_length, _dataset_for, _units_on_device
    from fastinf.extraction.models import make_task
    from fastinf.extraction.projection import ProjectionSpec, UnitProjector

    task_obj = make_task(task)
    task_name = getattr(task_obj, "name", str(task))
    ds, _ = _dataset_for(model, tokenizer, data, task_name)
    device, units = _units_on_device(model, layers, False, device)
    rows = np.arange(len(ds), dtype=np.int64)
    if max_samples is not None:
        if not isinstance(max_samples, int) or max_samples <= 0:
            raise ConfigError(f"max_samples must be a positive integer, got {max_samples!r}")
        if max_samples < len(ds):
            rng = np.random.default_rng(sample_seed)
            rows = np.sort(rng.choice(len(ds), size=max_samples, replace=False)).astype(np.int64)
    one = ProjectionSpec(kind="kron", k_out=1, k_in=1)
    projectors = {u.name: UnitProjector(u, one, device=device) for u in units}
    pads = {u.name: getattr(get_module(model, u), "padding_idx", None) for u in units if u.kind == "embedding"}
    return _Run(ds=ds, rows=rows, task=task_obj, task_name=task_name, units=units, projectors=projectors,
                pads=pads, device=device, max_length=_capped_max_length(model, max_length), batch_size=batch_size,
                chunk_size=chunk_size)


def _identity(run: _Run, model: torch.nn.Module, model_name: str | None) -> dict:
    """What the factors depend on: model, dataset, the rows used, units, task, length, chunking."""
    from fastinf.extraction.extract import model_fingerprint
    from fastinf.store.format import _unit_to_dict

    model_id = {**model_fingerprint(model), **({"name": model_name} if model_name else {})}
    return {"model": model_id, "task": run.task_name, "max_length": run.max_length,
            "dataset": {"name": run.ds.name, "fingerprint": run.ds.fingerprint(), "n": len(run.ds)},
            "rows": {"n": int(len(run.rows)), "sha256": hashlib.sha256(run.rows.tobytes()).hexdigest()[:32]},
            "units": [_unit_to_dict(u) for u in run.units], "chunk_size": run.chunk_size,
            "batch_size": run.batch_size}


def _first_difference(a: dict, b: dict) -> str:
    for key in ("model", "dataset", "rows", "units", "task", "max_length", "chunk_size", "batch_size"):
        if a.get(key) != b.get(key):
            return f"{key}: {str(a.get(key))[:120]} there vs {str(b.get(key))[:120]} now"
    return "unknown"


def _open_output(out: Path, identity: dict, run: _Run, *, resume: bool, overwrite: bool) -> Factors | None:
    """Start (or check) the factor set at ``out``; return it when an identical finished one is there."""
    m = read_manifest(out)
    if m is not None and overwrite:
        remove_own_artifact(out, FACTORS_KIND)
        m = None
    if m is not None:
        if m["identity"] != identity:
            raise ConfigError(f"{out} holds factors of another request ({_first_difference(m['identity'], identity)}); "
                              "use another --out, or --overwrite to replace them")
        if m.get("complete"):
            return Factors.open(out)
        if not resume:
            raise ConfigError(f"{out} holds an interrupted factor pass; pass --resume to continue it or --overwrite "
                              "to start over")
        return None
    make_output_dir(out)
    write_manifest(out, {"format": FORMAT, "version": VERSION, "identity": identity, "complete": False,
                         "n_chunks": run.n_chunks})
    return None


def _zero_sums(units: list[Unit]) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {"samples": np.zeros((), np.float64), "tokens": np.zeros((), np.float64)}
    for i, u in enumerate(units):
        d_in = u.d_in if u.kind == "embedding" else u.d_in + int(u.bias)
        sums[f"xx.{i}"] = np.zeros(d_in if u.kind == "embedding" else (d_in, d_in), np.float64)
        sums[f"gg.{i}"] = np.zeros((u.d_out, u.d_out), np.float64)
        sums[f"tok.{i}"] = np.zeros((), np.float64)
    return sums


def _run_chunks(run: _Run, model: torch.nn.Module, tokenizer: Any, out: Path, rank: int, world: int,
                progress: bool) -> None:
    """Process this rank's pending chunks, committing the running sums after each one."""
    from fastinf.extraction.extract import _progress_bar

    state = out / "state" / f"rank-{rank}.npz"
    sums, done = load_state(state)
    sums = sums or _zero_sums(run.units)
    pending = [c for c in range(run.n_chunks) if c % world == rank and c not in done]
    total = sum(len(run.rows[c * run.chunk_size:(c + 1) * run.chunk_size]) for c in pending)
    bar = _progress_bar(total, f"factors {out.name}", progress and rank == 0)
    try:
        for c in pending:
            rows = run.rows[c * run.chunk_size:(c + 1) * run.chunk_size]
            part = _chunk_sums(run, model, tokenizer, rows, bar)
            sums = {k: sums[k] + part[k] for k in sums}
            save_state(state, sums, done + [c])
            done = done + [c]
    finally:
        bar.close()


def _chunk_sums(run: _Run, model: torch.nn.Module, tokenizer: Any, rows: np.ndarray, bar: Any) -> dict:
    """The float64 sums of one chunk's rows, batch by batch in order of token length."""
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.extract import _tokenize

    texts = [run.ds.texts[i] for i in rows]
    pairs = [run.ds.text_pairs[i] for i in rows] if run.ds.text_pairs is not None else None
    lengths = np.array([len(x) for x in tokenizer(texts, pairs, truncation=True, max_length=run.max_length)["input_ids"]])
    order = rows[np.argsort(lengths, kind="stable")]
    acc: dict[str, torch.Tensor] = {}
    names = {u.name for u in run.units}
    for s in range(0, len(order), run.batch_size):
        b_rows = order[s:s + run.batch_size]
        batch = {k: v.to(run.device) for k, v in _tokenize(tokenizer, run.ds, b_rows, run.max_length,
                                                            run.task_name).items()}
        res = features_for_batch(model, run.units, run.projectors, batch, run.task, raw_units=names)
        for k, v in batch_sums(run.units, res.raw, batch.get("attention_mask"), run.pads).items():
            acc[k] = acc[k] + v if k in acc else v
        bar.update(len(b_rows))
    return {k: v.cpu().numpy() for k, v in acc.items()}


def batch_sums(units: list[Unit], raw: dict[str, tuple[torch.Tensor, torch.Tensor]],
               attention_mask: torch.Tensor | None, pads: dict[str, int | None] | None = None
               ) -> dict[str, torch.Tensor]:
    """One batch's sums from the captured ``(x, g)`` of every unit (``g`` already masked), returned in float64:
    ``xx.i = Σ m_t x̃_t x̃_tᵀ`` (embedding: token counts), ``gg.i = Σ g_t g_tᵀ``, ``tok.i = Σ m_t``, plus the
    batch's ``samples`` and ``tokens`` (the attention mask's sum). The products of one batch run in the
    capture's precision (float32; float64 models stay float64) — one GEMM per side — and are added across
    batches and chunks in float64."""
    pads = pads or {}
    B = next(iter(raw.values()))[1].shape[0]
    dev = next(iter(raw.values()))[1].device
    out: dict[str, torch.Tensor] = {"samples": torch.tensor(float(B), dtype=torch.float64, device=dev)}
    out["tokens"] = (attention_mask.to(torch.float64).sum() if attention_mask is not None else
                     torch.tensor(float(B), dtype=torch.float64, device=dev))
    for i, u in enumerate(units):
        x, g = raw[u.name]
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32   # per-batch products; sums in float64
        G = g.reshape(-1, u.d_out).to(dt)
        out[f"gg.{i}"] = (G.T @ G).to(torch.float64)
        if u.kind == "embedding":
            ids = x.reshape(-1)
            m = _token_mask(x, attention_mask).reshape(-1)
            if pads.get(u.name) is not None:
                m = m * (ids != pads[u.name]).to(torch.float64)
            out[f"xx.{i}"] = torch.zeros(u.d_in, dtype=torch.float64, device=dev).index_add_(0, ids, m)
        else:
            X = x.reshape(-1, u.d_in).to(dt)
            if u.bias:
                X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], dim=1)
            m = _token_mask(x[..., 0], attention_mask).reshape(-1)
            out[f"xx.{i}"] = ((X * m[:, None].to(dt)).T @ X).to(torch.float64)
        out[f"tok.{i}"] = m.sum()
    return out


def _token_mask(positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """float64 weights of ``positions`` ([B, T] or [B]): the attention mask where it fits, else ones."""
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(positions.shape):
        return attention_mask.to(torch.float64)
    return torch.ones(positions.shape, dtype=torch.float64, device=positions.device)


def _finalize(out: Path, run: _Run, world: int) -> Factors | None:
    """Add every rank's sums (rank order), normalise, eigendecompose and write the units; None if a rank is
    not done yet (its chunks are missing from the states)."""
    total: dict[str, np.ndarray] | None = None
    done: set[int] = set()
    for r in range(world):
        sums, chunks = load_state(out / "state" / f"rank-{r}.npz")
        done |= set(chunks)
        if sums:
            total = sums if total is None else {k: total[k] + sums[k] for k in total}
    missing = sorted(set(range(run.n_chunks)) - done)
    if missing:
        if world > 1:
            return None
        raise StoreError(f"the factor pass in {out} lacks chunks {missing[:8]}; rerun it with --resume")
    m = read_manifest(out)
    checksums, counts = [], []
    for i, u in enumerate(run.units):
        arrays = unit_arrays(u, total[f"xx.{i}"], total[f"gg.{i}"], float(total[f"tok.{i}"]), float(total["samples"]),
                             run.device)
        checksums.append(write_unit(out, i, arrays))
        counts.append({"tokens": int(total[f"tok.{i}"]), "samples": int(total["samples"])})
    m.update(complete=True, checksums=checksums, counts=counts, tokens=int(total["tokens"]),
             samples=int(total["samples"]), fingerprint=fingerprint_of(m["identity"], checksums))
    write_manifest(out, m)
    import shutil

    shutil.rmtree(out / "state", ignore_errors=True)
    return Factors.open(out)


def unit_arrays(u: Unit, xx: np.ndarray, gg: np.ndarray, tokens: float, samples: float,
                device: Any = "cpu") -> dict[str, np.ndarray]:
    """The stored arrays of one unit from its sums: ``A = xx/tokens``, ``S = gg/samples`` and eigenpairs."""
    if tokens <= 0 or samples <= 0:
        raise StoreError(f"unit {u.name} saw no tokens in the factor pass; check the data and the selection")
    S = gg / samples
    s_evals, s_evecs = eigh_desc(S, device)
    out = {"S": S, "s_evals": s_evals, "s_evecs": s_evecs}
    if u.kind == "embedding":
        out["a_diag"] = xx / tokens
    else:
        A = xx / tokens
        a_evals, a_evecs = eigh_desc(A, device)
        out.update(A=A, a_evals=a_evals, a_evecs=a_evecs)
    return out
