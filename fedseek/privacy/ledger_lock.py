"""One round at a time per ledger: an exclusive, non-blocking flock on a lock file next to it.

flock locks belong to an open file description, so two opens conflict whether they come from two
processes or two threads of one process; the kernel drops the lock when its holder dies, so a
crashed site never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedseek.privacy.ledger_chain import LedgerBusy, LedgerError


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (best effort: for the message only)."""
    try:
        info = json.loads(os.pread(fd, 512, 0) or b"{}")
        since = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        return f" (held by pid {int(info['pid'])} since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def acquire(path: Path) -> int:
    """Take the exclusive lock on `path` (created if needed) and return its descriptor; LedgerBusy if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        held = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LedgerBusy(f"another round is in progress at this site: the privacy ledger lock {path} is taken{held}; "
                             "this round is refused") from None
        raise LedgerError(f"cannot lock the privacy ledger ({path}: {exc.strerror})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "thread": threading.get_ident(), "since": time.time()}).encode(), 0)
    except OSError:
        pass  # the note is for messages only; the lock is what counts
    return fd


def release(fd: int) -> None:
    """Drop the lock and close its descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock on `path` for the block (LedgerBusy at once if another holder has it)."""
    fd = acquire(path)
    try:
        yield
    finally:
        release(fd)
