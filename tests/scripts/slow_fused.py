"""``fastinf score --aggregate`` with a pause after every task, so that a test can SIGKILL a fused run
between committed tasks deterministically (a tiny run otherwise ends in milliseconds). Everything else is
the real command.

Usage: python slow_fused.py SECONDS_PER_TASK -- <fastinf score arguments>
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastinf.scoring import fused  # noqa: E402
from fastinf.cli.app import main  # noqa: E402

if __name__ == "__main__":
    pause = float(sys.argv[1])
    run_task = fused.run_task

    def slow_task(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = run_task(*args, **kwargs)
        time.sleep(pause)
        return out

    fused.run_task = slow_task
    sys.exit(main(["score", *sys.argv[3:]]))
