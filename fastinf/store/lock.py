"""WriterLock: the per-rank lock file that keeps two processes from writing the same store at once."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from fastinf.errors import StoreLockedError


class WriterLock:
    """An exclusive lock file (O_CREAT|O_EXCL) holding pid and host; stale locks of dead pids are taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                owner = self._owner()
                pid = owner.split()[0] if owner.split() else "?"
                raise StoreLockedError(
                    f"{self.path.parent.parent} is being written by another process ({owner}): another fastinf "
                    f"process (pid {pid}) is writing it; wait for it to finish, or if it is gone remove "
                    f"{self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n")
            self.held = True
            return
        raise StoreLockedError(f"could not take the lock {self.path}")

    def _owner(self) -> str:
        """``pid host time`` of the lock's holder ("?" if unreadable)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def _stale(self) -> bool:
        try:
            pid_s, host, *_ = self.path.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False
