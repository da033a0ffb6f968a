"""Run under ``torchrun``: extract a train and a test store with the ``fastinf extract`` command (the
function ``python -m fastinf`` runs) and score them with ``fastinf.dist_score`` - every rank doing its
shard. One launch serves the whole distributed test, so the process start-up is paid once.

Usage: torchrun --nproc-per-node N dist_pipeline.py ASSETS_DIR OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastinf.cli.app import main as fastinf_main  # noqa: E402
from fastinf.scoring.dist_score import main as dist_score_main  # noqa: E402

EXTRACT = ["--proj", "4x4", "--batch-size", "8", "--chunk-size", "16", "--max-length", "16", "--dtype", "fp32",
           "--no-progress"]


def run(assets: Path, out: Path) -> None:
    for split in ("train", "test"):
        rc = fastinf_main(["extract", "--model", str(assets / "model"), "--data", str(assets / f"{split}.jsonl"),
                           "--out", str(out / split), *EXTRACT])
        if rc != 0:
            raise SystemExit(rc)
    for method in ("graddot", "if"):
        rc = dist_score_main(["--test", str(out / "test"), "--train", str(out / "train"), "--out",
                              str(out / f"scores-{method}"), "--method", method, "--block-size", "10"])
        if rc != 0:
            raise SystemExit(rc)


if __name__ == "__main__":
    import torch.distributed as dist

    run(Path(sys.argv[1]), Path(sys.argv[2]))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
