"""GPU benchmark of ``fastinf.kernels``: correctness against the torch references, then speed.

One command on a CUDA machine (finishes in < 5 min on one H200; needs only PyTorch + Triton +
transformers):

    python bench/gpu.py                         # writes bench/results/gpu.json, prints one table

It (1) checks every kernel (kron_project, embed_project, lowrank_apply) against its torch reference on
fresh random inputs over several shapes and dtypes (max |kernel - ref| / max |ref|); (2) times each
kernel against the reference (same math as fp32 matmuls) with CUDA events, median of repetitions after
a warm-up (autotuning happens in the warm-up); (3) times extraction end to end — fastinf's capture +
projection (``features_for_batch``, all units, 16x16) on a random MiniLM-size BERT and a Llama-1B-shape
model truncated to 2 layers — against a plain forward+backward training step of the same model and
batch, and checks the kernel-path features against the torch-path features.

Targets (issue 5): kron_project >= 2x the reference at 16x16 and 64x64; extraction >= 1.4x the
training-step throughput. Without CUDA the script exits with a message; ``--device cpu --tiny`` runs the
same code at tiny shapes under the Triton interpreter (a dry run of every code path, no timings worth
reading), which is what the CPU test suite does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"

# max |kernel - ref| / max |ref| allowed, by (input kind, output dtype name)
TOL = {("fp32", "float32"): 1e-5, ("half", "float32"): 2e-3, ("any", "float16"): 2e-3, ("any", "bfloat16"): 8e-3}


def tolerance(in_dtype: Any, out_dtype: Any) -> float:
    import torch
    out = str(out_dtype).replace("torch.", "")
    if out != "float32":
        return TOL[("any", out)]
    return TOL[("fp32" if in_dtype == torch.float32 else "half", "float32")]


@dataclass
class Row:
    """One line of the table / one record of the JSON."""

    kind: str                      # "kron" | "embed" | "lowrank" | "extract"
    case: str
    dtype: str
    max_rel_err: float | None = None
    tol: float | None = None
    ok: bool | None = None
    fast_ms: float | None = None   # kernel / extraction
    base_ms: float | None = None   # torch reference / training step
    ratio: float | None = None     # base_ms / fast_ms (speed-up, or extraction / training throughput)
    extra: dict = field(default_factory=dict)


class Bench:
    """Shared harness: device, timer, time budget, collected rows."""

    def __init__(self, device: str, tiny: bool, budget_s: float, reps: int, warmup: int) -> None:
        import torch
        self.torch = torch
        self.device = torch.device(device)
        self.tiny = tiny
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.reps = reps
        self.warmup = warmup
        self.rows: list[Row] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any], reps: int | None = None) -> float:
        """Median wall time of ``fn`` in ms (CUDA events on a GPU), after ``self.warmup`` untimed calls."""
        torch = self.torch
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def rel_err(got: Any, want: Any) -> float:
    diff = (got.double() - want.double()).abs().max()
    return float(diff / want.double().abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- inputs

def ragged_mask(B: int, T: int, device: Any, gen: Any) -> Any:
    """Right-padded (B, T) mask with lengths uniform in [T/2, T] (variable-length sequences)."""
    import torch
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=gen)
    return (torch.arange(T)[None, :] < lengths[:, None]).to(device)


def kron_inputs(B, T, d_in, d_out, k, dtype, device, seed, bias=True):
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=gen).to(device, dtype)
    g = torch.randn(B, T, d_out, generator=gen).to(device, dtype)
    P_in = (torch.randn(k, d_in + bias, generator=gen) / k ** 0.5).to(device)
    P_out = (torch.randn(k, d_out, generator=gen) / k ** 0.5).to(device)
    return x, g, ragged_mask(B, T, device, gen), P_in, P_out


def embed_inputs(B, T, V, d, k, dtype, device, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    g = torch.randn(B, T, d, generator=gen).to(device, dtype)
    P_V = (torch.randn(V, k, generator=gen) / k ** 0.5).to(device).T     # (k, V) view of a (V, k) matrix
    P_out = (torch.randn(k, d, generator=gen) / k ** 0.5).to(device)
    return ids, g, ragged_mask(B, T, device, gen), P_V, P_out


def lowrank_inputs(k, n, r, dtype, device, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, k, generator=gen).to(device, dtype)
    U = torch.linalg.qr(torch.randn(k, r, generator=gen))[0].to(device)
    w = (torch.rand(r, generator=gen) - 0.5).to(device)
    return Q.T, U, w, 0.1


# ------------------------------------------------------------------------------------------- cases

def kernel_cases(tiny: bool) -> dict[str, list[dict]]:
    """Shapes per kernel; ``time`` marks the cases that are also timed."""
    import torch
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    if tiny:
        return {
            "kron": [dict(name="tiny", B=2, T=9, d_in=13, d_out=21, k=16, dtype=dt, out=f32, time=dt == f32)
                     for dt in (f32, f16)] + [dict(name="tiny-64", B=2, T=5, d_in=7, d_out=9, k=64, dtype=f32,
                                                   out=f16, time=True)],
            "embed": [dict(name="tiny", B=2, T=9, V=50, d=21, k=16, dtype=f32, out=f32, time=True)],
            "lowrank": [dict(name="tiny", k=40, n=9, r=5, dtype=f32, time=True)],
        }
    kron = []
    for model, B, T, dims in (("minilm", 64, 128, ((384, 1536),)), ("1b", 8, 512, ((2048, 8192), (8192, 2048)))):
        for d_in, d_out in dims:
            for k in (16, 64):
                for dt in ((f32, bf16) if model == "minilm" else (bf16,)):
                    kron.append(dict(name=f"{model} {d_in}->{d_out} B{B} T{T} {k}x{k}", B=B, T=T, d_in=d_in,
                                     d_out=d_out, k=k, dtype=dt, out=f32, time=True))
    kron += [dict(name="minilm 384->1536 B32 T64 16x16", B=32, T=64, d_in=384, d_out=1536, k=16, dtype=f16,
                  out=f16, time=False),
             dict(name="minilm 384->1536 B32 T64 16x16", B=32, T=64, d_in=384, d_out=1536, k=16, dtype=f32,
                  out=bf16, time=False)]
    embed = [dict(name="minilm V30522 d384 B64 T128 16x16", B=64, T=128, V=30522, d=384, k=16, dtype=f32, out=f32,
                  time=True),
             dict(name="1b V128256 d2048 B8 T512 16x16", B=8, T=512, V=128256, d=2048, k=16, dtype=bf16, out=f32,
                  time=True)]
    lowrank = [dict(name="k256 n8192 r64", k=256, n=8192, r=64, dtype=f32, time=True),
               dict(name="k4096 n4096 r256", k=4096, n=4096, r=256, dtype=f32, time=True),
               dict(name="k256 n8192 r64 bf16", k=256, n=8192, r=64, dtype=bf16, time=False)]
    return {"kron": kron, "embed": embed, "lowrank": lowrank}


def run_kernels(b: Bench, reserve_s: float) -> None:
    """Check every case against the reference; time the cases marked ``time``. Stops starting new cases
    when less than ``reserve_s`` (kept for the extraction section) + 30 s of the budget is left."""
    from fastinf.kernels import dispatch, reference
    embed_mod, kron_mod, lowrank_mod = (dispatch.triton_module(m) for m in ("embed", "kron", "lowrank"))
    dev = b.device
    for kind, cases in kernel_cases(b.tiny).items():
        for i, c in enumerate(cases):
            if b.left() < reserve_s + 30:
                b.skipped.append(f"{kind} {c['name']} (time budget)")
                continue
            dt = c["dtype"]
            if kind == "kron":
                x, g, m, P_in, P_out = kron_inputs(c["B"], c["T"], c["d_in"], c["d_out"], c["k"], dt, dev, 100 + i)
                fast = lambda: kron_mod.kron_project(x, g, m, P_in, P_out, bias=True, out_dtype=c["out"])  # noqa: E731
                ref = lambda: reference._kron(x, g, m, P_in, P_out, True, c["out"])  # noqa: E731
                out_dt, nbytes = c["out"], x.numel() * x.element_size() + g.numel() * g.element_size()
            elif kind == "embed":
                ids, g, m, P_V, P_out = embed_inputs(c["B"], c["T"], c["V"], c["d"], c["k"], dt, dev, 200 + i)
                fast = lambda: embed_mod.embed_project(ids, g, m, P_V, P_out, out_dtype=c["out"])  # noqa: E731
                ref = lambda: reference._embed(ids, g, m, P_V, P_out, c["out"])  # noqa: E731
                out_dt, nbytes = c["out"], g.numel() * g.element_size()
            else:
                X, U, w, cc = lowrank_inputs(c["k"], c["n"], c["r"], dt, dev, 300 + i)
                fast = lambda: lowrank_mod.lowrank_apply(X, U, w, cc)  # noqa: E731
                ref = lambda: reference._lowrank(X, U, w, cc, None)  # noqa: E731
                out_dt, nbytes = dt, 2 * X.numel() * X.element_size()
            err = rel_err(fast(), ref())
            tol = tolerance(dt, out_dt)
            row = Row(kind, c["name"], f"{str(dt)[6:]}->{str(out_dt)[6:]}", err, tol, err <= tol)
            if c["time"]:
                row.fast_ms = b.time_ms(fast)
                row.base_ms = b.time_ms(ref)
                row.ratio = row.base_ms / row.fast_ms
                row.extra["kernel_GBps"] = nbytes / (row.fast_ms * 1e-3) / 1e9
            b.rows.append(row)


# ------------------------------------------------------------------------------------------- extraction

def _torch_classifier(vocab: int, d: int, layers: int, heads: int, kv_heads: int, ff: int, labels: int):
    """A pure-torch Llama-shaped sequence classifier (pre-norm blocks, grouped-query SDPA attention,
    SwiGLU MLP, ``score`` head on the last real token), named like HF Llama so fastinf finds its units.
    Used only when transformers is not installed (a stock PyTorch + Triton image)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hd = d // heads
            self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
            self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
            self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
            self.o_proj = nn.Linear(heads * self.hd, d, bias=False)

        def forward(self, h, keep):                                   # h (B, T, d), keep (B, 1, 1, T) bool
            B, T, _ = h.shape
            q = self.q_proj(h).view(B, T, heads, self.hd).transpose(1, 2)
            k = self.k_proj(h).view(B, T, kv_heads, self.hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
            v = self.v_proj(h).view(B, T, kv_heads, self.hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, T, hd)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
            self.down_proj = nn.Linear(ff, d, bias=False)

        def forward(self, h):
            return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
            self.self_attn, self.mlp = Attention(), MLP()

        def forward(self, h, keep):
            h = h + self.self_attn(self.input_layernorm(h), keep)
            return h + self.mlp(self.post_attention_layernorm(h))

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(vocab, d)
            self.model.layers = nn.ModuleList(Block() for _ in range(layers))
            self.model.norm = nn.LayerNorm(d)
            self.score = nn.Linear(d, labels, bias=False)

        def get_input_embeddings(self) -> nn.Embedding:
            return self.model.embed_tokens

        def forward(self, input_ids, attention_mask=None, **_):
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            keep = mask.bool()[:, None, None, :]
            h = self.model.embed_tokens(input_ids)
            for block in self.model.layers:
                h = block(h, keep)
            last = mask.sum(dim=1).clamp_min(1) - 1                    # right padding: last real token
            return self.score(self.model.norm(h)[torch.arange(h.shape[0], device=h.device), last])

    return Classifier()


def model_cases(tiny: bool) -> list[dict]:
    """Models for the extraction section: Hugging Face BERT / Llama when transformers is installed,
    else the pure-torch Llama-shaped classifier at the same sizes."""
    import torch
    try:
        import transformers as tf
    except ImportError:
        tf = None

    def llama(vocab, d, layers, heads, kv_heads, ff):
        if tf is None:
            return lambda: _torch_classifier(vocab, d, layers, heads, kv_heads, ff, 2)
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                pad_token_id=0, num_labels=2, tie_word_embeddings=False)
        return lambda: tf.LlamaForSequenceClassification(config)

    def bert(vocab, d, layers, heads, ff):
        if tf is None:
            return lambda: _torch_classifier(vocab, d, layers, heads, heads, ff, 2)
        config = tf.BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=ff, max_position_embeddings=512, num_labels=2)
        return lambda: tf.BertForSequenceClassification(config)

    src = "HF" if tf is not None else "pure-torch"
    if tiny:   # one decoder: the code path of both real cases (BERT extraction is covered by the tests)
        return [dict(name=f"llama-tiny ({src})", B=2, T=10, V=100, dtype=torch.float32,
                     build=llama(100, 32, 2, 2, 1, 64))]
    return [
        dict(name=f"MiniLM-size BERT 6L d384 B64 T128 ({src})", B=64, T=128, V=30522, dtype=torch.float32,
             build=bert(30522, 384, 6, 12, 1536)),
        dict(name=f"Llama-1B-shape 2L bf16 B8 T512 ({src})", B=8, T=512, V=128256, dtype=torch.bfloat16,
             build=llama(128256, 2048, 2, 32, 8, 8192)),
    ]


def run_extraction(b: Bench) -> None:
    """features_for_batch (all units, 16x16) with the kernels vs a forward+backward training step."""
    import torch

    for i, mc in enumerate(model_cases(b.tiny)):
        if b.left() < 45:
            b.skipped.append(f"extract {mc['name']} (time budget)")
            continue
        b.rows.append(extraction_case(b, mc, seed=400 + i))
        if b.device.type == "cuda":
            torch.cuda.empty_cache()


def extraction_case(b: Bench, mc: dict, seed: int) -> Row:
    """One model: check the kernel-path features against the torch path, then time both paths and a
    training step on the same ragged batch."""
    import torch

    import fastinf.kernels as K
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import SequenceClassification
    from fastinf.extraction.projection import ProjectionSpec, make_projectors
    from fastinf.extraction.units import discover, select

    torch.manual_seed(seed)
    with b.device:                                           # initialise the weights on the device (fast)
        model = mc["build"]().to(mc["dtype"]).eval()
    B, T, V = mc["B"], mc["T"], mc["V"]
    gen = torch.Generator().manual_seed(seed + 1)
    mask = ragged_mask(B, T, "cpu", gen).long()
    ids = torch.randint(1, V, (B, T), generator=gen) * mask              # pad id 0 after each sequence
    batch = {"input_ids": ids.to(b.device), "attention_mask": mask.to(b.device),
             "labels": torch.randint(0, 2, (B,), generator=gen).to(b.device)}
    units = select(discover(model), "all")
    projectors = make_projectors(units, ProjectionSpec(k_out=16, k_in=16), b.device)
    task = SequenceClassification()

    def extract(backend: str) -> dict:
        with K.use_backend(backend):
            return features_for_batch(model, units, projectors, batch, task).features

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = task.per_sample_loss(model, batch)
        loss.mean().backward()

    fast, slow, again = extract("triton"), extract("torch"), extract("torch")
    err = max(rel_err(fast[n], slow[n]) for n in fast)
    # two forward/backward passes may differ by themselves (e.g. atomics in attention backward):
    # the allowed error is the kernel tolerance or twice the torch path's own run-to-run error
    noise = max(rel_err(again[n], slow[n]) for n in slow)
    tol = max(tolerance(mc["dtype"], torch.float32), 2 * noise)
    row = Row("extract", mc["name"], str(mc["dtype"])[6:], err, tol, err <= tol,
              extra={"units": len(units), "feature_dim": 256, "torch_run_to_run_err": noise})
    reps = max(2, b.reps // 5)
    row.fast_ms = b.time_ms(lambda: extract("triton"), reps=reps)
    row.extra["torch_path_ms"] = b.time_ms(lambda: extract("torch"), reps=reps)
    row.base_ms = b.time_ms(train_step, reps=reps)
    model.zero_grad(set_to_none=True)
    row.ratio = row.base_ms / row.fast_ms                        # = extraction samples/s / training samples/s
    row.extra.update(extract_samples_per_s=B / row.fast_ms * 1e3, train_samples_per_s=B / row.base_ms * 1e3,
                     torch_path_ratio=row.base_ms / row.extra["torch_path_ms"])
    return row


# ------------------------------------------------------------------------------------------- report

def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(b: Bench) -> None:
    head = (f"{'kind':8} {'case':44} {'dtype':18} {'max_rel_err':>11} {'ok':>3} {'fast ms':>9} {'base ms':>9} "
            f"{'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in b.rows:
        print(f"{r.kind:8} {r.case[:44]:44} {r.dtype:18} {_fmt(r.max_rel_err, '.1e'):>11} "
              f"{'yes' if r.ok else 'NO':>3} {_fmt(r.fast_ms, '.3f'):>9} {_fmt(r.base_ms, '.3f'):>9} "
              f"{_fmt(r.ratio, '.2f'):>6}")
    print("fast = Triton kernel (extract: capture with the kernels); base = torch reference (extract: "
          "forward+backward training step); ratio = base/fast")
    for s in b.skipped:
        print(f"skipped: {s}")


def targets(b: Bench) -> dict:
    kron = [r for r in b.rows if r.kind == "kron" and r.ratio is not None]
    ext = [r for r in b.rows if r.kind == "extract" and r.ratio is not None]
    return {
        "all_checks_pass": all(r.ok for r in b.rows),
        "kron_min_speedup_16x16": min((r.ratio for r in kron if "16x16" in r.case), default=None),
        "kron_min_speedup_64x64": min((r.ratio for r in kron if "64x64" in r.case), default=None),
        "kron_target_2x_met": bool(kron) and all(r.ratio >= 2.0 for r in kron),
        "extract_min_ratio_vs_train_step": min((r.ratio for r in ext), default=None),
        "extract_target_1.4x_met": bool(ext) and all(r.ratio >= 1.4 for r in ext),
    }


def environment(b: Bench) -> dict:
    import torch
    import triton
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    dev = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "git_sha": sha, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
            "autotune": os.environ.get("FASTINF_TRITON_AUTOTUNE", "1")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default) or cpu; cpu needs --tiny and runs the kernels under the Triton interpreter")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of every code path)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this many seconds")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per kernel, extraction reps/5 (default 50; 2 with --tiny)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/gpu.json, "
                                                           "or gpu_dryrun.json with --device cpu)")
    p.add_argument("--skip-extract", action="store_true", help="kernels only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        if not args.tiny:
            print("bench/gpu.py: --device cpu only runs the --tiny dry run (the interpreter is far too slow for "
                  "real shapes).", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"          # before triton / fastinf.kernels kernel modules load
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU. "
              "Dry run of the same code on CPU: python bench/gpu.py --device cpu --tiny", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False        # the references are exact fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    reps = args.reps or (2 if args.tiny else 50)
    b = Bench(args.device, args.tiny, args.budget_s, reps, warmup=0 if args.tiny else 3)
    run_kernels(b, reserve_s=0 if args.skip_extract or args.tiny else 100)
    if not args.skip_extract:
        run_extraction(b)
    print_table(b)
    result = {"bench": "gpu", "mode": "cpu-interpreter-dry-run" if args.device == "cpu" else "cuda",
              "env": environment(b), "elapsed_s": round(time.monotonic() - b.t0, 1), "targets": targets(b),
              "rows": [asdict(r) for r in b.rows], "skipped": b.skipped,
              "note": ("dry run on CPU under the Triton interpreter (no CUDA device): the correctness checks are "
                        "real, the timings are not (interpreted kernels)" if args.device == "cpu"
                       else "kernel timings: CUDA events, median of reps after warm-up (autotuning in warm-up); "
                            "reference = fastinf.kernels.reference (fp32 matmuls, TF32 off)")}
    out = args.out or RESULTS / ("gpu_dryrun.json" if args.device == "cpu" else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"targets: {json.dumps(result['targets'])}")
    print(f"wrote {out} ({result['elapsed_s']} s)")
    return 0 if result["targets"]["all_checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
