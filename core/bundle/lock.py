"""Maintenance operations on one bundle take turns: an advisory lock file beside the bundle.

remove, append, merge into an existing path and build --out all read the bundle, write a new version and
publish it; two at once would each publish their own change over the other's (three concurrent removes once
kept 50 of 150 removed ids). Each holds ``.<bundle>.lock`` (flock, exclusive) from its first read to its
publish, so the read-modify-write is whole. The kernel drops the lock when its process dies, SIGKILL
included, so a crashed operation never blocks the next (its lock file stays behind, unlocked, until the next
operation takes and removes it). Readers (checks, the server) take no lock: they see the old version or the
new one.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from collections.abc import Callable

from ..errors import BundleBusyError


def lock_path(bundle: str | Path) -> Path:
    bundle = Path(bundle).expanduser()
    return bundle.parent / f".{bundle.name}.lock"


def _say(message: str) -> None:
    print(f"provenance-guard: {message}", file=sys.stderr, flush=True)


class BundleLock:
    """``with BundleLock(path, "index remove"):`` holds the bundle's maintenance lock; with wait=False a held
    lock raises BundleBusyError naming its holder, else the holder is named once and the call waits."""

    def __init__(self, bundle: str | Path, operation: str, wait: bool = True,
                 say: Callable[[str], None] = _say):
        self.bundle = Path(bundle).expanduser()
        self.path = lock_path(self.bundle)
        self.operation, self.wait, self.say = operation, wait, say
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(500).strip() or "another process"
        except OSError:
            return "another process"

    def __enter__(self) -> BundleLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not _try_lock(fd):
                    holder = self.holder()
                    if not self.wait:
                        raise BundleBusyError(f"bundle {self.bundle} is being changed by {holder}; wait for it to "
                                              f"finish or run again without --no-wait to queue behind it")
                    if not said:
                        self.say(f"bundle {self.bundle} is being changed by {holder}; waiting for it to finish")
                        said = True
                    _lock(fd)
                # The holder before us removes the file as it lets go: a lock on a file no longer at the path
                # guards nothing, so take the new one.
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{self.operation} (pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                try:
                    os.unlink(self.path)  # before unlocking: a waiter then sees it is gone and starts over
                except FileNotFoundError:
                    pass
                _unlock(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # Windows: a byte-range lock past the holder's note; released when the process ends
    import msvcrt

    _LOCK_OFFSET = 1 << 20

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.5)

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
