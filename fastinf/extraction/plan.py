"""Memory and storage planner: what an influence run will cost before any heavy work starts.

``plan(model_or_units, layers=..., proj=..., dtype=..., n=..., m=...)`` returns a :class:`Plan` with one
:class:`UnitPlan` row per selected unit and the totals a user needs to size a run:

==========================  ===================================================================================
bytes per sample            ``feature_dim x itemsize(dtype)`` per unit (what one row of the store costs)
store bytes                 train (``N`` rows) and test (``M`` rows) feature arrays, plus per-sample metadata
preconditioner bytes        ``identity``/graddot: 0; exact ``if``/``datainf``: ``k x k`` float64; low-rank
                            ``if`` (``rank=r``): ``k x r`` float64
extraction memory           model parameters + ``B x`` (activations autograd saves per sample + captured
                            per-unit tensors) + the chunk's feature buffers -> the largest safe batch ``B``
scoring memory per block    for a train block of ``b`` rows: decoded block (store dtype + float32 + float64),
                            float64 test features and the ``M x b`` score block (float64 accumulation, float32
                            written) -> the largest safe block ``b``
aggregation memory          per test-row slab of ``N`` scores: the slab, its ranks and the accumulators
fused score -> aggregate    ``Plan.fused``: memory (slabs of a set of test blocks, one slab's ranks, accumulators,
                            a train block) and disk (results + resume state) next to the two-stage score files
==========================  ===================================================================================

The extraction model is calibrated, not guessed, when a model is given: a *probe* runs the real capture
path (``fastinf.capture.features_for_batch``) on two tiny batches of ``max_length`` tokens under
``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of the distinct storages autograd saves;
the difference between the two batch sizes is the activation memory per sample (parameters and buffers
excluded). Captured tensors that are not saved by autograd are added analytically per unit call:
Kronecker units keep ``P_in x`` (``T x k_in``) and produce ``g`` (``T x d_out``); exact units and
embeddings keep ``x``. Given only units (no model), the activation term falls back to an analytic
estimate (each unit's input and output, ``T x (d_in + d_out) x 4`` bytes, twice), stated in the plan.

The "device memory" is the GPU's total memory on CUDA, else the memory available to this process
(psutil); a safety ``fraction`` (default 0.8) of it is the budget that safe sizes must fit in.
``auto_batch_size`` and ``auto_block_size`` are the helpers extraction and scoring call when the user
gives no size.

This module holds the plan itself (:class:`Plan`, :class:`UnitPlan`, :func:`plan` and the ``auto_*``
helpers); the byte formulas live in :mod:`fastinf.extraction.sizes` and the probe in
:mod:`fastinf.extraction.probe`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from fastinf.errors import ConfigError
from fastinf.extraction.probe import probe_activation_bytes
from fastinf.extraction.sizes import (META_BYTES_PER_SAMPLE, MAX_BATCH, _ITEMSIZE, _agg_bytes, _analytic_activation_bytes,
                                      _capture_bytes, _largest_batch, _largest_block, _precond_bytes, _score_bytes,
                                      device_memory_bytes, format_bytes, fused_atoms, fused_costs, parse_bytes)

__all__ = ["UnitPlan", "Plan", "plan", "auto_batch_size", "auto_block_size", "device_memory_bytes",
           "parse_bytes", "format_bytes", "probe_activation_bytes"]

DEFAULT_FRACTION = 0.8
_PRECOND_METHODS = ("identity", "graddot", "gradcos", "tracin", "if", "datainf", "lissa")


@dataclass(frozen=True)
class UnitPlan:
    """Costs of one unit (bytes). ``activation`` fields are per sample at ``max_length`` tokens."""

    name: str
    kind: str
    block: int
    role: str
    shape: tuple[int, int]
    feature_dim: int
    bytes_per_sample: int        # one stored row
    store_bytes: int             # N rows (train store)
    test_store_bytes: int        # M rows (test store)
    precond_bytes: int           # preconditioner state (float64)
    capture_bytes_per_sample: int  # tensors the capture holds beyond autograd's saved ones
    score_bytes_per_block: int   # scoring one train block of Plan.block_size rows against M tests

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    """The plan of one run: per-unit rows, totals, and the safe batch / block sizes.

    All sizes are bytes. ``budget`` is ``fraction x device_memory``. ``batch_size`` / ``block_size`` are
    the sizes that will be used (given by the user, else the largest safe ones).
    """

    units: list[UnitPlan]
    n: int
    m: int
    dtype: str
    proj: str
    method: str
    rank: int | None
    max_length: int
    device: str
    device_memory: int
    fraction: float
    param_bytes: int
    activation_bytes_per_sample: int
    activation_source: str       # "probe" (measured saved tensors) or "analytic" (units only)
    chunk_size: int
    batch_size: int
    block_size: int
    safe_batch_size: int
    safe_block_size: int
    agg_block_rows: int
    notes: list[str] = field(default_factory=list)
    fused: dict = field(default_factory=dict)   # the fused score -> aggregate pass (sizes.fused_costs)

    # ------------------------------------------------------------------ totals
    @property
    def budget(self) -> int:
        return int(self.device_memory * self.fraction)

    @property
    def bytes_per_sample(self) -> int:
        return sum(u.bytes_per_sample for u in self.units)

    @property
    def feature_dims(self) -> int:
        return sum(u.feature_dim for u in self.units)

    @property
    def store_bytes(self) -> int:
        """Train store on disk: features plus per-sample metadata."""
        return sum(u.store_bytes for u in self.units) + self.n * META_BYTES_PER_SAMPLE

    @property
    def test_store_bytes(self) -> int:
        return sum(u.test_store_bytes for u in self.units) + self.m * META_BYTES_PER_SAMPLE

    @property
    def precond_bytes(self) -> int:
        return sum(u.precond_bytes for u in self.units)

    @property
    def score_file_bytes(self) -> int:
        """Per-unit ``M x N`` float32 score arrays on disk (memory-mapped, not resident)."""
        return 4 * self.m * self.n * len(self.units)

    @property
    def capture_bytes_per_sample(self) -> int:
        return sum(u.capture_bytes_per_sample for u in self.units)

    def batch_bytes(self, batch_size: int | None = None) -> int:
        """Predicted working memory of one capture batch (forward + backward + projection)."""
        b = self.batch_size if batch_size is None else int(batch_size)
        return b * (self.activation_bytes_per_sample + self.capture_bytes_per_sample)

    def extract_bytes(self, batch_size: int | None = None, chunk_size: int | None = None) -> int:
        """Predicted peak working memory of extraction (excluding the parameters) at ``batch_size``."""
        b = self.batch_size if batch_size is None else int(batch_size)
        c = max(b, self.chunk_size if chunk_size is None else int(chunk_size))
        per_sample = self.activation_bytes_per_sample + self.capture_bytes_per_sample
        # chunk buffers: per-batch float32 features (list), their concatenation, the storage copy
        chunk = c * (self.feature_dims * (4 + 4 + _ITEMSIZE[self.dtype]) + 2 * META_BYTES_PER_SAMPLE)
        return b * per_sample + chunk

    def extract_peak_bytes(self, batch_size: int | None = None) -> int:
        """Parameters plus :meth:`extract_bytes`."""
        return self.param_bytes + self.extract_bytes(batch_size)

    def score_bytes(self, block_size: int | None = None) -> int:
        """Predicted peak working memory of scoring one unit's train block of ``block_size`` rows."""
        b = self.block_size if block_size is None else int(block_size)
        return max((_score_bytes(u.feature_dim, self.m, b, self.dtype) for u in self.units), default=0) + \
            max((u.precond_bytes for u in self.units), default=0)

    def aggregate_bytes(self, rows: int | None = None) -> int:
        """Predicted working memory of aggregation over ``rows`` test rows at a time (N columns)."""
        r = self.agg_block_rows if rows is None else int(rows)
        return _agg_bytes(self.n, r)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "units"}
        d["units"] = [u.to_dict() for u in self.units]
        d["totals"] = {
            "bytes_per_sample": self.bytes_per_sample, "store_bytes": self.store_bytes,
            "test_store_bytes": self.test_store_bytes, "precond_bytes": self.precond_bytes,
            "score_file_bytes": self.score_file_bytes, "budget": self.budget,
            "extract_bytes": self.extract_bytes(), "extract_peak_bytes": self.extract_peak_bytes(),
            "score_bytes": self.score_bytes(), "aggregate_bytes": self.aggregate_bytes(),
            "fused_disk_bytes": self.fused.get("disk_bytes"), "fused_memory_bytes": self.fused.get("memory_bytes"),
        }
        return d

    def table(self) -> str:
        """A readable report: one row per unit, then totals and sizes."""
        w = max([len(u.name) for u in self.units] + [4])
        lines = [f"plan: N={self.n:,} train, M={self.m:,} test, proj {self.proj}, dtype {self.dtype}, "
                 f"method {self.method}, max_length {self.max_length}, device {self.device} "
                 f"({format_bytes(self.device_memory)}, budget {format_bytes(self.budget)})",
                 f"{'unit':<{w}}  {'k':>6} {'B/sample':>9} {'store':>10} {'precond':>10} "
                 f"{'capture/sample':>14} {'score/block':>11}"]
        for u in self.units:
            lines.append(f"{u.name:<{w}}  {u.feature_dim:>6} {u.bytes_per_sample:>9,} {format_bytes(u.store_bytes):>10} "
                         f"{format_bytes(u.precond_bytes):>10} {format_bytes(u.capture_bytes_per_sample):>14} "
                         f"{format_bytes(u.score_bytes_per_block):>11}")
        lines += [
            f"{'total':<{w}}  {self.feature_dims:>6} {self.bytes_per_sample:>9,} {format_bytes(self.store_bytes):>10} "
            f"{format_bytes(self.precond_bytes):>10} {format_bytes(self.capture_bytes_per_sample):>14}",
            f"test store {format_bytes(self.test_store_bytes)}; score files {format_bytes(self.score_file_bytes)} "
            f"(memory-mapped)",
            f"extraction: parameters {format_bytes(self.param_bytes)}, activations "
            f"{format_bytes(self.activation_bytes_per_sample)}/sample ({self.activation_source}); "
            f"batch {self.batch_size} -> {format_bytes(self.extract_peak_bytes())}; largest safe batch "
            f"{self.safe_batch_size}",
            f"scoring: block {self.block_size:,} train rows -> {format_bytes(self.score_bytes())}; largest safe "
            f"block {self.safe_block_size:,}",
            f"aggregation: {self.agg_block_rows} test rows per slab -> {format_bytes(self.aggregate_bytes())}",
        ]
        f = self.fused
        if f:
            lines.append(f"fused score->aggregate ({f['groups']} groups x {f['hows']} hows, {f['atoms']} atoms): disk "
                         f"{format_bytes(f['disk_bytes'])} (results {format_bytes(f['result_bytes'])} + resume state "
                         f"{format_bytes(f['state_bytes'])}) vs two-stage score files "
                         f"{format_bytes(self.score_file_bytes)}; memory {format_bytes(f['memory_bytes'])} (slabs of "
                         f"{f['test_block']} test rows, {f['set_blocks']} per set, {f['train_passes_per_unit']} "
                         f"train pass(es) per unit)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------- entry

def plan(model_or_units: Any, layers: str | Sequence[str] | None = "all", proj: str | Any = "16x16", *,
         dtype: str = "fp16", n: int = 1, m: int = 1, batch_size: int | None = None,
         block_size: int | None = None, chunk_size: int | None = None, max_length: int = 128,
         method: str = "graddot", rank: int | None = None, task: Any = "seq-cls",
         device: Any = None, device_memory: int | str | None = None, fraction: float = DEFAULT_FRACTION,
         probe: bool = True, groups: Sequence[str] = ("first", "middle", "last", "all"),
         hows: Sequence[str] = ("rank", "vote", "mean")) -> Plan:
    """Plan an influence run: per-unit store/preconditioner/scoring costs and safe batch/block sizes.

    Args:
        model_or_units: a torch model (units are discovered, activations probed) or a list of Units.
        layers: unit selector (fastinf.units.select) or the selected Unit list. proj: "16x16" | "exact" | ProjectionSpec.
        dtype: store dtype (fp16 | bf16 | fp32). n, m: train and test sample counts.
        batch_size, block_size, chunk_size: sizes to plan for (None: the largest safe ones / the
            extraction default chunk).
        max_length: tokens per sample (the worst case: every sample padded to it).
        method, rank: estimator and low-rank IF rank (preconditioner memory).
        device, device_memory: where the run happens and how much memory it has ("16G", bytes; default:
            the device's memory). fraction: share of it the safe sizes may use.
        probe: measure activations with two tiny forward/backward passes (model given); False uses the
            analytic estimate. groups, hows: the aggregation the fused pass is planned for.
    """
    import torch

    from fastinf.extraction.projection import ProjectionSpec, check_fits
    from fastinf.store import canonical_dtype

    _check_plan_args(n, m, max_length, fraction, method)
    dtype = canonical_dtype(dtype)
    spec = ProjectionSpec.parse(proj) if not isinstance(proj, ProjectionSpec) else proj
    model = model_or_units if isinstance(model_or_units, torch.nn.Module) else None
    all_units, units = _plan_units(model, model_or_units, layers)
    check_fits(units, spec)  # refused before the probe builds any projection matrix
    T = int(max_length)
    notes: list[str] = []
    param_bytes, dev, act, source = _model_costs(model, all_units, units, spec, T, task, device, probe, notes)
    mem = parse_bytes(device_memory) if device_memory is not None else device_memory_bytes(dev)
    budget = int(mem * fraction)
    rows = _unit_rows(units, spec, n, m, _ITEMSIZE[dtype], method, rank, T)
    safe_batch, bs, cs = _extraction_sizes(rows, act, param_bytes, budget, n, _ITEMSIZE[dtype], batch_size,
                                           chunk_size, notes)
    safe_block, blk, rows, pre_max = _scoring_sizes(rows, m, n, dtype, budget, block_size, notes)
    agg_rows = _aggregation_rows(n, m, budget, pre_max, notes)
    p = Plan(units=rows, n=int(n), m=int(m), dtype=dtype, proj=str(spec), method=method, rank=rank,
             max_length=T, device=dev, device_memory=int(mem), fraction=float(fraction),
             param_bytes=int(param_bytes), activation_bytes_per_sample=int(act), activation_source=source,
             chunk_size=int(cs), batch_size=bs, block_size=blk, safe_batch_size=int(safe_batch),
             safe_block_size=int(safe_block), agg_block_rows=agg_rows, notes=notes)
    atoms = fused_atoms(units, groups)
    p.fused = {"groups": len(groups), "hows": len(hows), "atoms": atoms,
               **fused_costs(n, m, [r.feature_dim for r in rows], _ITEMSIZE[dtype], atoms, len(groups), len(hows))}
    return p


def _check_plan_args(n: int, m: int, max_length: int, fraction: float, method: str) -> None:
    """Reject non-positive counts and lengths, a fraction outside (0, 1] and an unknown method."""
    if n <= 0 or m <= 0:
        raise ConfigError(f"n and m must be positive sample counts, got n={n}, m={m}")
    if max_length <= 0:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if method not in _PRECOND_METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(_PRECOND_METHODS)}")


def _plan_units(model: Any, model_or_units: Any, layers: Any) -> tuple[list[Any], list[Any]]:
    """(all units, selected units): discovered from the model or given, then selected by ``layers``."""
    from fastinf.extraction.units import discover, select

    all_units = discover(model) if model is not None else list(model_or_units)
    if not all_units:
        raise ConfigError("plan needs a model or a non-empty list of units")
    if isinstance(layers, (list, tuple)) and layers and not isinstance(layers[0], str):
        units = list(layers)  # already-selected Unit objects
    else:
        units = select(all_units, layers)
    return all_units, units


def _model_costs(model: Any, all_units: list[Any], units: list[Any], spec: Any, T: int, task: Any,
                 device: Any, probe: bool, notes: list[str]) -> tuple[int, str, int, str]:
    """(parameter bytes, device name, activation bytes per sample, their source "probe" | "analytic")."""
    import torch

    if model is not None:
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
            sum(b.numel() * b.element_size() for b in model.buffers())
        dev = device if device is not None else next(model.parameters()).device
        if probe:
            act = probe_activation_bytes(model, units, spec, T, task)
            source = "probe"
        else:
            act, source = _analytic_activation_bytes(all_units, T), "analytic"
    else:
        param_bytes = sum(4 * u.exact_dim for u in all_units)
        dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        act, source = _analytic_activation_bytes(all_units, T), "analytic"
        notes.append("no model given: activations are an analytic estimate; pass the model for a measured probe")
    return param_bytes, str(torch.device(dev)), act, source


def _unit_rows(units: list[Any], spec: Any, n: int, m: int, item: int, method: str, rank: int | None,
               T: int) -> list[UnitPlan]:
    """One :class:`UnitPlan` per selected unit (``score_bytes_per_block`` filled in once the block is known)."""
    from fastinf.extraction.projection import feature_dim

    rows: list[UnitPlan] = []
    for u in units:
        k = feature_dim(u, spec)
        rows.append(UnitPlan(
            name=u.name, kind=u.kind, block=u.block, role=u.role, shape=(u.d_out, u.d_in), feature_dim=k,
            bytes_per_sample=k * item, store_bytes=n * k * item, test_store_bytes=m * k * item,
            precond_bytes=_precond_bytes(method, k, rank), capture_bytes_per_sample=_capture_bytes(u, spec, T),
            score_bytes_per_block=0))
    return rows


def _extraction_sizes(rows: list[UnitPlan], act: int, param_bytes: int, budget: int, n: int, item: int,
                      batch_size: int | None, chunk_size: int | None, notes: list[str]) -> tuple[int, int, int]:
    """(largest safe batch, batch used, chunk used): params + B*(act + capture) + chunk buffers <= budget."""
    feat_total = sum(r.feature_dim for r in rows)
    per_sample = act + sum(r.capture_bytes_per_sample for r in rows)
    chunk_row = feat_total * (4 + 4 + item) + 2 * META_BYTES_PER_SAMPLE
    safe_batch = _largest_batch(budget - param_bytes, per_sample, chunk_row, chunk_size)
    safe_batch = min(safe_batch, n)
    if safe_batch < 1:
        notes.append(f"even batch 1 needs {format_bytes(param_bytes + per_sample + chunk_row)} of a "
                     f"{format_bytes(budget)} budget: shorten max_length, select fewer units or use a larger device")
    bs = int(batch_size) if batch_size is not None else max(1, safe_batch)
    cs = int(chunk_size) if chunk_size is not None else max(bs, min(4096, bs * 16))
    return safe_batch, bs, cs


def _scoring_sizes(rows: list[UnitPlan], m: int, n: int, dtype: str, budget: int, block_size: int | None,
                   notes: list[str]) -> tuple[int, int, list[UnitPlan], int]:
    """(largest safe block, block used, rows with their block cost, largest preconditioner): the worst
    unit's train block plus its preconditioner must fit the budget."""
    pre_max = max((r.precond_bytes for r in rows), default=0)
    safe_block = min(_largest_block([r.feature_dim for r in rows], m, dtype, budget, pre_max), n)
    if safe_block < 1:
        notes.append(f"scoring does not fit: M={m} test rows and the preconditioner ({format_bytes(pre_max)}) "
                     f"exceed the {format_bytes(budget)} budget; score the test set in parts")
    blk = int(block_size) if block_size is not None else max(1, safe_block)
    rows = [dataclasses.replace(r, score_bytes_per_block=_score_bytes(r.feature_dim, m, blk, dtype)) for r in rows]
    return safe_block, blk, rows, pre_max


def _aggregation_rows(n: int, m: int, budget: int, pre_max: int, notes: list[str]) -> int:
    """Test rows per aggregation slab; notes when one row, or the preconditioner, exceeds the budget."""
    agg_rows = int(max(1, min(m, 256, (budget - 16 * n) // max(1, 20 * n))))
    if _agg_bytes(n, 1) > budget:
        notes.append(f"aggregating one test row over N={n:,} train samples needs {format_bytes(_agg_bytes(n, 1))}, "
                     f"more than the {format_bytes(budget)} budget")
    if pre_max and pre_max > budget:
        notes.append(f"preconditioner of {format_bytes(pre_max)} exceeds the budget: use rank=r low-rank IF")
    return agg_rows


def auto_batch_size(model: Any, units: Sequence[Any] | str | None, proj: Any = "16x16", *, max_length: int = 128,
                    dtype: str = "fp16", task: Any = "seq-cls", n: int | None = None,
                    device_memory: int | str | None = None, fraction: float = DEFAULT_FRACTION,
                    cap: int = 256) -> int:
    """The largest safe extraction batch for ``model`` (at most ``cap``; at least 1).

    ``units`` is a selector string or the selected Unit list. Call this from extraction when the user
    gave no batch size.
    """
    p = plan(model, layers=units if units is not None else "all", proj=proj, dtype=dtype, n=n or MAX_BATCH, m=1, max_length=max_length,
             task=task, device_memory=device_memory, fraction=fraction)
    return int(max(1, min(cap, p.safe_batch_size)))


def auto_block_size(feature_dims: Sequence[int], m: int, *, n: int, dtype: str = "fp16",
                    precond_bytes: int = 0, device: Any = None, device_memory: int | str | None = None,
                    fraction: float = DEFAULT_FRACTION, cap: int = 65536) -> int:
    """The largest safe scoring train block (rows) for units of ``feature_dims`` against ``m`` tests."""
    from fastinf.store import canonical_dtype

    dtype = canonical_dtype(dtype)
    mem = parse_bytes(device_memory) if device_memory is not None else device_memory_bytes(device)
    budget = int(mem * fraction)
    return int(max(1, min(cap, n, _largest_block(list(feature_dims) or [1], m, dtype, budget, precond_bytes))))
