"""SIGTERM handled like Ctrl-C: the command unwinds, stops every process it started, and exits 143.

Python's default SIGTERM action ends the process at once, without `finally` blocks, which
left a simulation's SuperLink and SuperExec running. `handle_termination` turns SIGTERM into
`Terminated` (a KeyboardInterrupt, so every clean-up path written for Ctrl-C runs for it too).
Only the first SIGINT/SIGTERM interrupts: later ones are ignored so that the clean-up itself
is not cut short. `deferred` holds signals back while a step that must not be torn in two
runs (submitting a run: its id is needed to stop it), then delivers them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


class _State:
    received: int | None = None  # the signal delivered (then the others are ignored)
    holding = 0  # depth of `deferred` blocks
    pending: int | None = None  # a signal received while holding


def _raise_for(signum: int) -> None:
    _State.received = signum
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.received is not None:
        return
    if _State.holding:
        _State.pending = _State.pending or signum
        return
    _raise_for(signum)


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt / Terminated once (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _State.received, _State.holding, _State.pending = None, 0, None
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the block runs; deliver the first one held when it ends."""
    _State.holding += 1
    try:
        yield
    finally:
        _State.holding -= 1
        if not _State.holding and _State.pending is not None and _State.received is None:
            signum, _State.pending = _State.pending, None
            _raise_for(signum)


def received() -> int | None:
    """The signal that interrupted the command (within `handle_termination`), or None.

    Libraries may swallow the exception on its way up (typer turns a KeyboardInterrupt into exit
    code 130), so the command line asks here which signal it was.
    """
    return _State.received


def exit_code(exc: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def signal_exit_code(signum: int) -> int:
    """143 for SIGTERM, 130 for SIGINT."""
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
