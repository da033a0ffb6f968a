"""``fastinf layers MODEL``: list a model's influence units, their shapes, feature dims and store bytes.

The model skeleton is built from its config (GGUF: the file's metadata) on the ``meta`` device, so
no weights are read or dequantised; anything the skeleton path cannot build falls back to a full
``load_model``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch
from torch import nn

from fastinf.errors import ConfigError
from fastinf.extraction.projection import ProjectionSpec, feature_dim
from fastinf.extraction.units import Unit, discover, n_blocks, select

log = logging.getLogger(__name__)

STORE_DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}


def _skeleton(name: str, task: str, num_labels: int | None) -> nn.Module:
    """The model's module tree with meta tensors (no memory, no weights), or a fully loaded model."""
    from fastinf.extraction.models import (  # noqa: PLC0415
        _checked_load_args, _head_size, check_lm_task, load_model, packaged_model_path,
    )

    _checked_load_args(task, num_labels, "float32")
    path, gguf = packaged_model_path(name)
    try:
        import transformers as tf  # noqa: PLC0415

        config = tf.AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        log.info("config of %s not readable (%s); loading the model", name, e)
        config = None
    if config is not None:
        if task == "causal-lm":
            check_lm_task(config, name)
        else:
            config.num_labels = _head_size(config, num_labels, name)
        try:
            return _meta_model(tf, config, task)
        except (OSError, ValueError, KeyError) as e:
            log.info("meta skeleton of %s failed (%s); loading the model", name, e)
    model, _ = load_model(name, task=task, num_labels=num_labels)
    return model


def _meta_model(tf: Any, config: Any, task: str) -> nn.Module:
    """``config``'s model (head size already set) built on the meta device."""
    auto = tf.AutoModelForSequenceClassification if task == "seq-cls" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def unit_table(units: list[Unit], spec: ProjectionSpec, dtype: str = "float16",
               n_blocks_total: int | None = None) -> dict[str, Any]:
    """Rows (one per unit) and totals of feature dims and store bytes per sample. ``n_blocks_total`` is
    the model's depth L (defaults to the depth spanned by ``units``)."""
    if dtype not in STORE_DTYPE_BYTES:
        raise ConfigError(f"Unknown store dtype {dtype!r}; expected one of {sorted(STORE_DTYPE_BYTES)}.")
    nbytes = STORE_DTYPE_BYTES[dtype]
    rows = []
    for u in units:
        k = feature_dim(u, spec)
        rows.append(u.to_dict() | {"shape": list(u.shape), "params": u.exact_dim, "feature_dim": k,
                                   "bytes_per_sample": k * nbytes})
    total_k = sum(r["feature_dim"] for r in rows)
    return {"projection": str(spec), "dtype": dtype, "n_blocks": n_blocks_total if n_blocks_total is not None else n_blocks(units), "units": rows,
            "total": {"units": len(rows), "params": sum(r["params"] for r in rows), "feature_dim": total_k,
                      "bytes_per_sample": total_k * nbytes, "bytes_per_million": total_k * nbytes * 10**6}}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(table: dict[str, Any]) -> str:
    head = ("name", "kind", "block", "role", "shape", "feat", "bytes/sample")
    lines = [[r["name"], r["kind"], str(r["block"]), r["role"], f"{r['d_out']}x{r['d_in']}" + ("+b" if r["bias"] else ""),
              str(r["feature_dim"]), str(r["bytes_per_sample"])] for r in table["units"]]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    t = table["total"]
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append(f"{t['units']} units over {table['n_blocks']} blocks, projection {table['projection']}, "
               f"store {table['dtype']}: {t['feature_dim']} features = {_human(t['bytes_per_sample'])}/sample, "
               f"{_human(t['bytes_per_million'])} per million samples")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    spec = ProjectionSpec.parse(args.proj)
    model = _skeleton(args.model, args.task, args.num_labels)
    every = discover(model)
    units = select(every, args.layers)
    table = unit_table(units, spec, args.dtype, n_blocks(every))
    table["model"] = args.model
    if args.json:
        json.dump(table, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(table))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("layers", help="list a model's influence units, feature dims and bytes per sample",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hub id, local path, 'minilm' or 'smollm2'")
    p.add_argument("--layers", default="all",
                   help="selector: all, first, last, middle, blocks[a:b], q1..q4, attn.v, mlp, lora_b, globs; "
                        "comma union, -X excludes (default: all)")
    p.add_argument("--proj", default="16x16", help="projection KOUTxKIN or 'exact' (default 16x16)")
    p.add_argument("--dtype", default="float16", choices=sorted(STORE_DTYPE_BYTES), help="store dtype (default float16)")
    p.add_argument("--task", default="seq-cls", choices=("seq-cls", "causal-lm"), help="head to attach (default seq-cls)")
    p.add_argument("--num-labels", type=int, default=None, help="classes of a fresh classification head")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
