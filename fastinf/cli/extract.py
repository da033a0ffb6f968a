"""`fastinf extract`: per-sample projected gradients of a model over a dataset into a GradientStore."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract per-sample, per-unit projected gradients into a store",
                       description="Run MODEL over DATA and write per-sample projected gradients of the "
                                   "selected units to a crash-safe, resumable GradientStore.")
    p.add_argument("--model", required=True, help="HF name or local path, 'minilm' (packaged MiniLM-L6), "
                                                   "'smollm2' (packaged SmolLM2-135M GGUF), or a checkpoint dir")
    p.add_argument("--data", required=True, help="'sms' (packaged demo), a csv/tsv/jsonl/parquet file, or a "
                                                  "hub name such as glue:sst2")
    p.add_argument("--split", default="train", help="dataset split for hub datasets / data directories")
    p.add_argument("--out", required=True, help="output store directory")
    p.add_argument("--layers", default="all", help="unit selector: first,last,middle,all,blocks[a:b],q1..q4,"
                                                   "attn.v,mlp,lora_b, globs; unions with commas")
    p.add_argument("--proj", default="16x16", help="KOUTxKIN Kronecker projection (default 16x16), 'exact', or "
                                                   "pcaKxK / pcamixKxK / kfacKxK with --factors (or KxK@DIR)")
    p.add_argument("--factors", default=None, metavar="DIR",
                   help="the factor set (`fastinf factors`) of a pca/pcamix/kfac projection")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="storage dtype")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch (default: the largest safe batch from `fastinf plan`)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--task", default="seq-cls", choices=["seq-cls", "causal-lm"])
    p.add_argument("--num-labels", type=int, default=None, help="classes of a fresh classification head")
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    p.add_argument("--offset", type=int, default=0, help="skip the first N samples (e.g. a held-out test part)")
    p.add_argument("--limit", type=int, default=None, help="use only N samples (after --offset)")
    p.add_argument("--noise", type=float, default=None, metavar="RATE",
                   help="flip this fraction of the labels (uniform, seeded by --noise-seed) before extracting; "
                        "needs --noise-out")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of --noise (default 0)")
    p.add_argument("--noise-out", default=None, help="where --noise writes its mask and labels (.npz)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--token-grads", action="store_true", help="also store token ids and embedding-row "
                                                              "gradients (for tracin_we)")
    p.add_argument("--reps", action="store_true", help="also store every block's masked-mean hidden state "
                                                       "(for the repsim baseline)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per crash-safe chunk")
    p.add_argument("--resume", action="store_true", help="continue an interrupted extraction in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a store already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the store summary as JSON")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before any heavy work (a 0 is an error, never a silent default)."""
    from fastinf.errors import ConfigError

    for flag, value in (("--num-labels", args.num_labels), ("--chunk-size", args.chunk_size),
                        ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if args.offset < 0:
        raise ConfigError(f"--offset must be >= 0, got {args.offset}")
    if args.num_labels is not None and args.num_labels < 2 and args.task == "seq-cls":
        raise ConfigError(f"--num-labels must be at least 2 for a classifier, got {args.num_labels}")
    if args.noise is not None:
        if not 0.0 <= args.noise < 1.0:
            raise ConfigError(f"--noise must be a fraction in [0, 1), got {args.noise}")
        if not args.noise_out:
            raise ConfigError("--noise needs --noise-out FILE.npz (where the noise mask goes)")
        if args.task != "seq-cls":
            raise ConfigError("--noise flips class labels; it needs --task seq-cls")
    elif args.noise_out:
        raise ConfigError("--noise-out is only used with --noise RATE")


def _check_output(args: argparse.Namespace) -> None:
    """Before loading data or a model: ``--proj`` parses and ``--out`` may be written (a file, or a directory
    holding anything but a store fastinf wrote, is refused; ``--overwrite`` never removes foreign files)."""
    from fastinf.extraction.projection import ProjectionSpec
    from fastinf.store.claim import preflight_store

    ProjectionSpec.parse(args.proj, seed=args.seed, factors=args.factors)
    preflight_store(args.out, resume=args.resume, overwrite=args.overwrite)


def load_data(args: argparse.Namespace):
    """The dataset of ``--data`` with ``--offset``/``--limit`` applied (and ``--noise`` injected, saved)."""
    from fastinf.data.datasets import load_dataset_spec
    from fastinf.errors import DataError

    limit = None if args.limit is None else args.offset + args.limit
    ds = load_dataset_spec(args.data, split=args.split, text_column=args.text_column,
                           text_pair_column=args.text_pair_column, label_column=args.label_column,
                           limit=limit, need_labels=args.task != "causal-lm")
    if args.offset:
        if args.offset >= len(ds):
            raise DataError(f"--offset {args.offset} skips all {len(ds)} samples of {args.data!r}")
        ds = ds.subset(range(args.offset, len(ds)))
    if args.noise is not None:
        from fastinf.data.noise import inject_noise

        noise = inject_noise(ds.labels, args.noise, seed=args.noise_seed)
        noise.save(args.noise_out)
        ds = ds.with_labels(noise.labels)
    return ds


def run(args: argparse.Namespace) -> int:
    import torch

    from fastinf.distributed import init_from_env
    from fastinf.extraction.extract import extract, write_run_config
    from fastinf.extraction.models import load_model

    check_args(args)
    _check_output(args)
    init_from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_data(args)
    num_labels = args.num_labels or (ds.num_classes if args.task == "seq-cls" else None)
    model, tok = load_model(args.model, task=args.task, num_labels=num_labels)
    from fastinf.extraction.projection import ProjectionSpec

    proj = ProjectionSpec.parse(args.proj, seed=args.seed, factors=args.factors)
    store = extract(model, tok, ds, args.out, layers=args.layers, proj=proj, task=args.task,
                    dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                    resume=args.resume, overwrite=args.overwrite, chunk_size=args.chunk_size,
                    token_grads=args.token_grads, reps=args.reps, device=device, progress=not args.no_progress,
                    model_name=args.model)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        write_run_config(args.out, {k: v for k, v in vars(args).items() if k != "func"})
        summary = store.summary()
        if args.json:
            json.dump(summary, sys.stdout, indent=1)
            print()
        else:
            from fastinf.cli.store import print_summary

            print_summary(summary)
    return 0
