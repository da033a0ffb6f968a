"""`fastinf index build|info`: build a retrieval index next to a train store, or describe / check one."""
from __future__ import annotations

import argparse
import json
import sys

from fastinf.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or inspect a FAISS retrieval index over a train store")
    ss = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = ss.add_parser("build", help="build an inner-product index per unit or unit group (streams the store)")
    b.add_argument("store", help="train GradientStore directory")
    b.add_argument("--layers", default=None, help="unit selector (default: all stored units), e.g. 'middle,last'")
    b.add_argument("--groups", default="unit",
                   help="'unit' (one index per unit), 'joint' (one over all selected units), or selectors "
                        "separated by ';', one group each (e.g. 'attn.v;mlp.down')")
    b.add_argument("--weights", default=None, help="unit weights inside groups: 'UNIT=W,UNIT=W' (default 1)")
    b.add_argument("--factory", default="Flat",
                   help="FAISS index_factory string: Flat, IVF4096,Flat, IVF4096,PQ32, ...")
    b.add_argument("--method", default="graddot",
                   choices=["graddot", "gradcos", "if", "datainf", "lissa", "kfac", "ekfac"],
                   help="estimator the inner product reproduces (if/datainf/ekfac precondition the queries; "
                        "kfac needs a kfac store, ekfac a pca store)")
    b.add_argument("--damping", default=None,
                   help="preconditioner damping for if/datainf/lissa/ekfac, e.g. 1e-3 or rel:0.1")
    b.add_argument("--factors", default=None, metavar="DIR",
                   help="pca/pcamix/kfac stores: the factor set they were extracted with (checked by fingerprint; "
                        "recorded so that `fastinf search` can extract new texts the same way)")
    b.add_argument("--rank", type=int, default=None, help="low-rank IF preconditioner (Woodbury) of this rank")
    b.add_argument("--backend", default="auto", choices=["auto", "faiss", "exact"],
                   help="faiss (CPU/GPU FAISS), exact (blocked matmul at query time, CUDA when present)")
    b.add_argument("--nprobe", type=int, default=None,
                   help="default IVF lists probed at search (default nlist/64, >= 8)")
    b.add_argument("--train-size", type=int, default=None, help="rows sampled to train IVF/PQ (default ~50 per list)")
    b.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    b.add_argument("--block-size", type=int, default=65536, help="rows per streamed block")
    b.add_argument("--name", default=None, help="index name: <store>/index/<name> (default from method/factory/layers)")
    b.add_argument("--out", default=None, help="index directory (overrides --name)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted build: repeat the original arguments; finished groups are kept "
                           "and the result equals an uninterrupted build (a different request is refused)")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.set_defaults(func=run_build)
    i = ss.add_parser("info", help="print an index's manifest; check it against its store and its files' checksums")
    i.add_argument("index", help="index directory")
    i.add_argument("--store", default=None, help="train store (if it moved since the build)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run_info)


def parse_weights(text: str | None) -> dict[str, float] | None:
    """'a=0.5,b=2' -> {'a': 0.5, 'b': 2.0}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, val = item.rpartition("=")
        if not sep or not name:
            raise ConfigError(f"--weights expects UNIT=W pairs separated by commas; got {item!r}")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise ConfigError(f"--weights: {val!r} (for unit {name!r}) is not a number") from None
    return out


def parse_groups(text: str) -> str | list[str]:
    """'unit' | 'joint' | 'sel;sel;...' (one group per selector); a text naming no selector is refused."""
    if text in ("unit", "joint"):
        return text
    groups = [g.strip() for g in text.split(";")]
    if not groups or any(not g for g in groups):
        raise ConfigError(f"--groups {text!r} has an empty selector; give 'unit', 'joint' or selectors separated "
                          "by ';' (e.g. 'attn.v;mlp.down')")
    return groups


def run_build(args: argparse.Namespace) -> int:
    from fastinf.retrieval.build import build_index

    precond = {k: v for k, v in (("damping", args.damping), ("rank", args.rank)) if v is not None}
    idx = build_index(args.store, layers=args.layers, groups=parse_groups(args.groups),
                      weights=parse_weights(args.weights), method=args.method, factory=args.factory,
                      backend=args.backend, name=args.name, out=args.out, nprobe=args.nprobe,
                      train_size=args.train_size, seed=args.seed, block_size=args.block_size,
                      overwrite=args.overwrite, resume=args.resume, precond_kwargs=precond or None,
                      exist_ok=True, factors=args.factors)   # a rerun of the same command returns the finished index as it is
    _print(idx, args.json)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from fastinf.retrieval.index import open_index

    idx = open_index(args.index, args.store)
    problems = idx.verify()
    if problems:
        from fastinf.errors import CorruptStoreError

        raise CorruptStoreError(f"index {idx.directory}: {'; '.join(problems)}; rebuild it with --overwrite")
    _print(idx, args.json)
    return 0


def _print(idx, as_json: bool) -> None:
    m = idx.manifest
    if as_json:
        json.dump({"index": str(idx.directory), **m.to_dict()}, sys.stdout, indent=1)
        print()
        return
    print(f"index    {idx.directory}")
    print(f"store    {m.store_path}  (n={m.n}, fingerprint {m.store_fingerprint[:12]}, matches)")
    print(f"method   {m.method}   backend {m.backend}   factory {m.factory}   nprobe {m.nprobe}   "
          f"build {m.build.get('seconds')} s")
    for g in m.groups:
        w = "" if all(x == 1.0 for x in g.weights) else f"  weights {list(g.weights)}"
        print(f"  group {g.name:<32} dim {g.dim:>6}  units {len(g.units)}{w}")
