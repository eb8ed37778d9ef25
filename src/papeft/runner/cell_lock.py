"""One process per experiment cell: an exclusive lock on `{run_dir}/cell.lock`.

The lock is `flock` on that file (released by the kernel when its process dies, however it dies,
so a dead holder's lock is free for the next run: taken over, never stale). The holder writes its
pid, host and start time into the file, so a second process can say who holds the cell; it then
stops with `CellLocked` and touches nothing else. On a file system without `flock` the file's
content decides: a lock of a live process on this host is respected, any other one is taken over
(with a warning: processes on other hosts cannot be checked there). The file stays after release
(empty), so there is no window in which two processes lock two different files.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
from pathlib import Path

from papeft.io import HOST, pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = "cell.lock"


class CellLocked(RuntimeError):
    """Another process runs this cell; the message names it."""


class CellLock:
    """`with CellLock(run_dir):` holds the cell for this process (raises CellLocked if another does)."""

    def __init__(self, directory: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(directory) / LOCK_FILE, enabled
        self.fd: int | None = None

    def _holder(self, fd: int) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict) -> CellLocked:
        who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
               if holder else "another process")
        return CellLocked(f"{self.path.parent} is being run by {who}; this process leaves it alone. "
                          f"Wait for that run to end or stop it; the lock ({self.path}) frees itself when it exits.")

    def acquire(self) -> "CellLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise self._refuse(holder) from None
        except OSError as exc:          # no flock here (some network file systems): the file's content decides
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            holder = self._holder(fd)
            if holder.get("host") == HOST and isinstance(holder.get("pid"), int) and pid_alive(holder["pid"]):
                os.close(fd)
                raise self._refuse(holder) from None
            log.warning("%s: no flock on this file system; taking the cell over from %s", self.path, holder or "nobody")
        previous = self._holder(fd)
        if previous:
            log.warning("%s: taking over the lock of %s, which no longer holds it", self.path, previous)
        me = {"pid": os.getpid(), "host": HOST, "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)      # empty: free (what the no-flock fallback reads)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "CellLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
