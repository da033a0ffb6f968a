"""`fastinf run CONFIG.yaml`: noise -> train -> extract -> score -> aggregate -> evaluate -> report.

Stages are cached under the output directory and reused when their inputs are unchanged, so a run
can be interrupted and restarted, or re-run after editing only the aggregation or evaluation sections; a
rerun of a finished run changes nothing. The output directory must be new, empty or a run directory
fastinf wrote; ``--overwrite`` clears only such a directory and starts over.
``--set section.key=value`` overrides single config values (YAML syntax for the value).
"""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a layer-wise influence experiment from a YAML config",
                       description="Run the staged experiment described by CONFIG (see configs/*.yaml): "
                                   "label noise, fine-tuning, extraction, scoring, aggregation over unit "
                                   "groups, NDR evaluation and the layer cost-vs-quality report.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2 --set seeds=[0,1,2]")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: clear the output directory first (only a run directory fastinf wrote)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary rows as JSON")
    p.set_defaults(func=run)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested config mapping."""
    import yaml

    from fastinf.errors import ConfigError

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a config section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({' '.join(str(e).split())})") from None
    return data


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastinf.experiment.config import RunConfig, from_dict, read_yaml_mapping
    from fastinf.experiment.pipeline import run_experiment
    from fastinf.experiment.report import compact_table

    path = Path(args.config)
    data = read_yaml_mapping(path)
    cfg = from_dict(RunConfig, apply_overrides(data, args.set), where=str(path))
    res = run_experiment(cfg, args.out, progress=not args.no_progress and not args.json,
                         echo=(lambda m: None) if args.json else print, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res.results["summary"], indent=1, default=str))
        return 0
    print()
    print(compact_table(res.results))
    print(f"\nreport: {res.report.markdown}  (also {res.report.html.name}, results.json, results.parquet)")
    if res.stages_cached:
        print(f"reused {len(res.stages_cached)} cached stage(s); ran {len(res.stages_run)}")
    return 0
