"""An exclusive lock on a workdir for the life of one training run.

``flock`` on ``WORKDIR/.lock``: the kernel releases it however the holder ends (a crash or
SIGKILL included), so a lock is never stale; the file keeps the holder's PID for the
message a second trainer gets.
"""

import fcntl
import os
from pathlib import Path

from vqvae.errors import UserError


class WorkdirBusy(UserError, RuntimeError):
    """Another training run holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the lock or raises ``WorkdirBusy`` at once."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusy(
                f"{self.workdir} is in use by another training run (PID {holder}); wait for "
                "it to end or stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
