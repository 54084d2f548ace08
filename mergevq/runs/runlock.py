"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/run.lock``, which holds the
holder's ``pid host`` while it runs.

The kernel drops an ``flock`` when its process dies, so a lock file left by a killed run is stale
exactly when it can be locked again: it is then taken over, with a log line naming the dead holder.
A second live writer is refused with one line naming the holder. Released (and the file removed) by
:meth:`RunLock.release`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from ..errors import RunDirError

LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming the live holder."""
        if self.held:
            return
        while True:
            fd = self._lock()
            try:  # the holder before us may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = _read(fd)
        if stale:
            log.warning("took over the stale lock %s of a run that is no longer alive (%s)", self.path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _lock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another run ({holder or 'unknown holder'}, lock "
                f"{self.path}): wait for it to finish, or give this run its own directory (MERGEVQ_RUN_DIR or "
                "hydra.run.dir)") from None
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
