"""Measure the peak resident memory of one capture batch (features_for_batch) in a fresh process.

Usage: python measure_capture_memory.py 'FAMILY TASK LAYERS PROJ BATCH MAX_LENGTH HIDDEN N_LAYERS' [...]
Prints one JSON line per configuration: {"measured": bytes above the pre-batch RSS, "predicted": the
plan's batch bytes, ...}.

Run with MALLOC_MMAP_THRESHOLD_ set (see tests/test_plan.py) so that freed tensors go back to the OS and
RSS tracks live memory. The peak is read from /proc/self/status (VmHWM) after resetting it through
/proc/self/clear_refs, so import-time peaks do not count.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from fastinf.extraction.capture import features_for_batch  # noqa: E402
from fastinf.extraction.plan import plan  # noqa: E402
from fastinf.extraction.projection import ProjectionSpec, make_projectors  # noqa: E402
from fastinf.extraction.units import discover, select  # noqa: E402


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _model(family: str, task: str, hidden: int, n_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                            intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=3)
        cfg._attn_implementation = "eager"
        return tf.BertForSequenceClassification(cfg).eval()
    cfg = tf.GPT2Config(vocab_size=512, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=3)
    cfg._attn_implementation = "eager"
    return (tf.GPT2LMHeadModel(cfg) if task == "causal-lm" else tf.GPT2ForSequenceClassification(cfg)).eval()


def measure(config: str) -> dict:
    family, task, layers, proj, *rest = config.split()
    batch, T, hidden, n_layers = (int(a) for a in rest)
    model = _model(family, task, hidden, n_layers)
    spec = ProjectionSpec.parse(proj)
    units = select(discover(model), layers)
    projectors = make_projectors(units, spec)
    p = plan(model, units, spec, n=batch, m=1, batch_size=batch, max_length=T, task=task)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (batch, T), generator=gen)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    b["labels"] = ids if task == "causal-lm" else torch.randint(0, 3, (batch,), generator=gen)
    small = {k: v[:1] for k, v in b.items()}
    features_for_batch(model, units, projectors, small, task)  # warm up (thread pools, lazy inits)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    out = features_for_batch(model, units, projectors, b, task)
    peak = _status("VmHWM")
    del out
    return {"config": config, "measured": peak - base, "predicted": p.batch_bytes(batch), "base": base,
            "activation_per_sample": p.activation_bytes_per_sample,
            "capture_per_sample": p.capture_bytes_per_sample}


def main() -> None:
    torch.set_num_threads(1)
    for config in sys.argv[1:]:
        print(json.dumps(measure(config)), flush=True)


if __name__ == "__main__":
    main()
