"""Run under ``torchrun``: fused ``fastinf score --aggregate`` commands, one after another (every rank runs
its tasks; rank 0 writes the outputs), for tests/test_fused_kill_resume_and_two_ranks_equal_one_process.py.
One launch serves several commands, so the process start-up is paid once.

Usage: torchrun --nproc-per-node N dist_fused.py <score arguments> [:: <score arguments> ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastinf.cli.app import main  # noqa: E402


def commands(argv: list[str]) -> list[list[str]]:
    """The argument lists separated by ``::``."""
    out: list[list[str]] = [[]]
    for a in argv:
        if a == "::":
            out.append([])
        else:
            out[-1].append(a)
    return [c for c in out if c]


if __name__ == "__main__":
    import torch.distributed as dist

    rc = 0
    for cmd in commands(sys.argv[1:]):
        rc = rc or main(["score", *cmd])
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)
