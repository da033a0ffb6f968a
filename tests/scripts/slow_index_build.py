"""``fastinf index build`` with slow storage: every FAISS file write is followed by a pause, so that a
test can SIGKILL the build between groups deterministically (a build of a tiny store otherwise ends in
milliseconds). The pause falls between writing a group's temp file and renaming it into place, so a kill
there also leaves the half-finished temp file a real crash would. Everything else is the real command.

Usage: python slow_index_build.py SECONDS_PER_WRITE -- <fastinf index build arguments>
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastinf.retrieval import backends as search_backends  # noqa: E402
from fastinf.cli.app import main  # noqa: E402

if __name__ == "__main__":
    pause = float(sys.argv[1])
    write = search_backends.write

    def slow_write(index, path):  # type: ignore[no-untyped-def]
        write(index, path)
        time.sleep(pause)

    search_backends.write = slow_write
    sys.exit(main(["index", "build", *sys.argv[3:]]))
