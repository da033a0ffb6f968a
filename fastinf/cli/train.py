"""`fastinf train`: fine-tune a sequence classifier (full or LoRA) with per-epoch checkpoints.

Either from flags, or from the ``data``/``noise``/``model``/``train`` sections of a run config
(``--config``; flags given explicitly override it). Writes ``ckpt-<epoch>/`` (epoch 0 = initial),
``train.json``, ``lr_log.json`` (TracIn's learning rates), the noise mask when ``--noise`` > 0, and a
replayable ``config.yaml``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier (full or LoRA) with per-epoch checkpoints",
                       description="Fine-tune an HF sequence classifier with AdamW + warmup/cosine; save one "
                                   "checkpoint per epoch with its learning rate; select the checkpoint with "
                                   "the lowest loss on the held-out set.")
    p.add_argument("config", nargs="?", default=None,
                   help="a run config (YAML); its data/noise/model/train sections (flags override them)")
    p.add_argument("--config", dest="config_opt", default=None, help="the same, as an option")
    p.add_argument("--model", default=None, help="local dir, cached hub id, or 'minilm' (packaged MiniLM-L6)")
    p.add_argument("--data", default=None, help="training data spec: 'sms', a file, a directory, a hub name")
    p.add_argument("--test", default=None, help="held-out data spec (default: a split of --data)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--noise", type=float, default=None, help="uniform label-noise rate in [0, 1)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--lora-targets", default=None, help="comma-separated module-name suffixes (query,value)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output directory (default with a config: <config out>/train); a rerun of a finished "
                        "training with the same settings does nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output directory's training (only a directory `fastinf train` wrote)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _config_from_args(args: argparse.Namespace):
    from fastinf.experiment.config import LoraSettings, RunConfig, from_dict, to_dict

    path = args.config or args.config_opt
    cfg = RunConfig.from_yaml(path) if path else RunConfig()
    d = to_dict(cfg)
    sets = {("model", "name"): args.model, ("data", "train"): args.data, ("data", "test"): args.test,
            ("data", "n_train"): args.n_train, ("data", "n_test"): args.n_test, ("noise", "rate"): args.noise,
            ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size, ("train", "lr"): args.lr,
            ("model", "max_length"): args.max_length}
    for (sec, key), v in sets.items():
        if v is not None:
            d[sec][key] = v
    if args.full:
        d["train"]["lora"] = None
    else:
        lora = d["train"]["lora"] or to_dict(LoraSettings())
        for key, v in (("r", args.lora_r), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout)):
            if v is not None:
                lora[key] = v
        if args.lora_targets:
            lora["target_modules"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        d["train"]["lora"] = lora
    d["seeds"] = [args.seed]
    return from_dict(RunConfig, d)


def _out_dir(args: argparse.Namespace, cfg) -> Path:
    """--out, or ``<config out>/train`` when a run config was given."""
    from fastinf.errors import ConfigError

    if args.out is not None:
        return Path(args.out)
    if args.config or args.config_opt:
        return Path(cfg.out) / "train"
    raise ConfigError("--out is required without a run config: name the output directory (--out DIR)")


def _previous(out: Path, cfg_text: str, overwrite: bool):
    """The finished training of the same settings in ``out`` (a rerun is a no-op), else None; refuses an
    unfinished or different training there unless ``overwrite``."""
    from fastinf.errors import ConfigError
    from fastinf.experiment.train import TrainResult

    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return None
    same = (out / "config.yaml").is_file() and (out / "config.yaml").read_text() == cfg_text
    if same and (out / "train.json").is_file():
        return TrainResult.load(out)
    what = "a training with other settings" if (out / "config.yaml").is_file() and not same else "an unfinished training"
    raise ConfigError(f"{out} holds {what}; pass --overwrite to replace it, or choose another --out")


def run(args: argparse.Namespace) -> int:
    from fastinf.data.noise import inject_noise
    from fastinf.experiment.pipeline import load_splits
    from fastinf.experiment.rundir import open_output_dir
    from fastinf.experiment.train import finetune

    cfg = _config_from_args(args)
    out = _out_dir(args, cfg)
    cfg_text = cfg.to_yaml()
    outdir = open_output_dir(out, "train", overwrite=args.overwrite)   # refuses a foreign directory first
    result = _previous(out, cfg_text, args.overwrite)
    if result is None:
        train, test = load_splits(cfg)
        with outdir:
            (out / "config.yaml").write_text(cfg_text)
            if cfg.noise.rate > 0:
                nz = inject_noise(train.labels, cfg.noise.rate, seed=args.seed, kind=cfg.noise.kind,
                                  class_rates=cfg.noise.class_rates, transition=cfg.noise.transition)
                nz.save(out / "noise.npz")
                train = train.with_labels(nz.labels)
            result = finetune(cfg.model, cfg.train, train, test, out, seed=args.seed,
                              progress=not args.json and not args.no_progress)
    elif not args.json:
        print(f"{out}: already trained with these settings; nothing to do (--overwrite trains again)")
    if args.json:
        print(json.dumps({"best_epoch": result.best_epoch, "best": result.best.path, "history": result.history,
                          "lr_log": result.lr_log(), "seconds": result.seconds}, indent=2))
        return 0
    for h in result.history:
        print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}  held-out loss {h['heldout_loss']:.4f}  "
              f"acc {h['heldout_acc']:.3f}")
    print(f"scored checkpoint: {result.best.path} (epoch {result.best_epoch}); lr log: {out / 'lr_log.json'}")
    return 0
