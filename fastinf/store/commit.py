"""Group commit of written chunks: fsync the data files, then record the chunks, off the writing thread.

A chunk counts as written only once its record is in the progress log, and a record is appended only after
an fsync of every data file that *started after* the chunk's ``pwrite`` returned — so a SIGKILL or power
loss leaves every recorded chunk on disk, and ``resume`` recomputes exactly the unrecorded ones (the crash
safety of chunked.py is unchanged).

What changes is who waits. Before, every ``write_chunk`` fsynced all of the store's files and the log in
the extraction loop, which then stalled for the disk (exact stores: ~100 MB chunks). Now ``submit`` queues
the chunk's record and returns; a background thread fsyncs the files once for *all* chunks queued since
its last fsync (a chunk group: one fsync covers as many chunks as arrived while the previous one ran),
appends their records and fsyncs the log. The writing thread blocks only when more than ``max_bytes``
(64 MiB by default) of submitted data is not yet durable, which bounds both the dirty page cache and the
work a crash can lose. ``flush`` waits until everything submitted is recorded; an OS error of the
background thread (disk full at fsync, ...) is raised by the next ``submit`` / ``flush``.
"""
from __future__ import annotations

import json
import os
import threading
from typing import IO, Callable

__all__ = ["ChunkCommitter", "MAX_UNSYNCED_BYTES"]

MAX_UNSYNCED_BYTES = 64 << 20


class ChunkCommitter:
    """Background group commit (see the module docstring) of one writer's chunks into ``progress``.

    ``fds()`` returns the data file descriptors to fsync (read when a group starts; the writer opens files
    before it submits the chunk written to them, and closes them only after :meth:`close`).
    """

    def __init__(self, progress: IO[str], fds: Callable[[], list[int]], max_bytes: int = MAX_UNSYNCED_BYTES
                 ) -> None:
        self._progress, self._fds, self._max = progress, fds, int(max_bytes)
        self._cond = threading.Condition()
        self._queue: list[tuple[dict, int]] = []
        self._unsynced = 0          # bytes submitted and not yet recorded
        self._busy = False
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fastinf-store-commit", daemon=True)
        self._thread.start()

    def submit(self, record: dict, nbytes: int) -> None:
        """Queue ``record`` of a chunk whose ``nbytes`` of data are written (not yet fsynced)."""
        with self._cond:
            self._raise_error()
            while self._unsynced > 0 and self._unsynced + nbytes > self._max and self._error is None:
                self._cond.wait()
            self._raise_error()
            self._queue.append((record, int(nbytes)))
            self._unsynced += int(nbytes)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every submitted chunk is fsynced and recorded (raises a background OS error)."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise_error()

    def close(self, *, quiet: bool = False) -> BaseException | None:
        """Flush, then stop the thread (idempotent). ``quiet``: return a background OS error instead of
        raising it."""
        try:
            self.flush()
            error = None
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            if not quiet or not isinstance(e, OSError):
                self._shutdown()
                raise
            error = e
        self._shutdown()
        return error

    def _shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        """Take every queued record, fsync the data files once, append the records, fsync the log."""
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue, self._busy = self._queue, [], True
            try:
                self._commit(group)
            except BaseException as e:  # noqa: BLE001 - re-raised in the writing thread
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._unsynced -= sum(n for _, n in group)
                self._cond.notify_all()

    def _commit(self, group: list[tuple[dict, int]]) -> None:
        for fd in self._fds():
            os.fsync(fd)
        for record, _ in group:
            self._progress.write(json.dumps(record, sort_keys=True) + "\n")
        self._progress.flush()
        os.fsync(self._progress.fileno())
