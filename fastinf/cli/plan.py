"""`fastinf plan`: bytes per sample, store size, preconditioner and scoring memory, safe batch/block sizes.

A thin shell over :func:`fastinf.plan.plan`. With ``--model`` the model is loaded and the activation
memory is measured by a two-batch probe; with ``--config`` (an HF config directory/JSON) only the shapes
are used (no weights are loaded or run) and activations are estimated analytically.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the memory/storage plan of a run before any heavy work",
                       description="Per unit: bytes per sample, store size, preconditioner memory, scoring "
                                   "memory per block; totals and the largest safe batch and block sizes.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF name or local path, 'minilm', 'smollm2' (loaded; activations probed)")
    src.add_argument("--config", help="an HF config.json or directory: shapes only, nothing is run")
    p.add_argument("--task", default="seq-cls", choices=["seq-cls", "causal-lm"])
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--layers", default="all", help="unit selector (see `fastinf layers`)")
    p.add_argument("--proj", default="16x16", help="KOUTxKIN or 'exact'")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="store dtype")
    p.add_argument("-n", "--n", type=int, required=True, help="train samples")
    p.add_argument("-m", "--m", type=int, default=256, help="test samples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None, help="plan for this batch (default: largest safe)")
    p.add_argument("--block-size", type=int, default=None, help="plan for this train block (default: largest safe)")
    p.add_argument("--method", default="graddot", help="estimator (preconditioner memory): graddot, if, datainf, ...")
    p.add_argument("--rank", type=int, default=None, help="low-rank IF rank")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 (default: cuda if available)")
    p.add_argument("--device-memory", default=None, help="memory to plan for, e.g. 16G (default: the device's)")
    p.add_argument("--fraction", type=float, default=0.8, help="share of the memory safe sizes may use")
    p.add_argument("--aggregate", default="rank,vote,mean", help="fused pass: the aggregations planned for")
    p.add_argument("--groups", default="first,middle,last,all", help="fused pass: the unit groups planned for")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _units_from_config(path: str, task: str, num_labels: int | None) -> list:
    """Discover units on a model built on the meta device from a config (no memory, no weights)."""
    import torch
    import transformers as tf

    from fastinf.extraction.units import discover

    cfg = tf.AutoConfig.from_pretrained(path)
    if num_labels:
        cfg.num_labels = num_labels
    auto = tf.AutoModelForCausalLM if task == "causal-lm" else tf.AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return discover(model)


def run(args: argparse.Namespace) -> int:
    from fastinf.aggregation.aggregate import _parse_hows
    from fastinf.cli.aggregate import parse_groups
    from fastinf.extraction.plan import plan

    if args.model:
        from fastinf.extraction.models import load_model

        model, _ = load_model(args.model, task=args.task, num_labels=args.num_labels, device=args.device or "cpu")
        target = model
    else:
        target = _units_from_config(args.config, args.task, args.num_labels)
    p = plan(target, args.layers, args.proj, dtype=args.dtype, n=args.n, m=args.m, batch_size=args.batch_size,
             block_size=args.block_size, max_length=args.max_length, method=args.method, rank=args.rank,
             task=args.task, device=args.device, device_memory=args.device_memory, fraction=args.fraction,
             groups=parse_groups(args.groups), hows=_parse_hows(args.aggregate))
    if args.json:
        json.dump(p.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(p.table())
    return 0
