"""One writer per folder: a non-blocking, inter-process ``flock`` on a lock file.

The kernel drops an ``flock`` when its holder dies (any signal, SIGKILL included), so a lock left by a
killed process is recovered by the next taker without any timeout or PID guessing; the lock file's text
(pid, host, start time, command) only serves the message shown to a refused second process. The file
is removed on release; a taker that finds it was replaced while it waited re-opens it (the classic
unlink race), so two processes can never both believe they hold it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import MMBalanceError


class FolderBusyError(MMBalanceError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive lock on ``folder/name``; :meth:`acquire` raises :class:`FolderBusyError` when taken."""

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self._fd: int | None = None

    def holder(self) -> str:
        """The lock file's description of its holder (best effort, for messages)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
                + (f": {info['argv']}" if info.get("argv") else ""))

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderBusyError(
                    f"{self.what} {str(self.folder)!r} is in use by another process ({self.holder()}); "
                    "wait for it to finish (or stop it), or choose another folder") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed while we waited for it: take the new file instead
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "argv": " ".join(sys.argv[1:])[:500]}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiter re-opens (see acquire)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = ".lock", what: str = "run folder", take: bool = True
                ) -> Iterator[FolderLock | None]:
    """``with folder_lock(dir):`` — hold the folder's lock for the block (``take=False``: a no-op, for
    the non-main ranks of a distributed run, whose main rank holds it)."""
    if not take:
        yield None
        return
    lock = FolderLock(folder, name, what)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
