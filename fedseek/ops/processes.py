"""Starting and stopping the Flower daemons fedseek launches, by process id, never by name.

Ray and Flower spawn grandchildren that outlive their parents (orphaned raylet/agents were
measured after killing a SuperLink), so a `ProcessTree` keeps sampling the descendants and the
session of the process it started and, on stop, terminates every one it saw. A process is
named by its pid and its start time (psutil's create_time), so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO

import psutil

#: Two start times closer than this name the same process: psutil derives create_time from the
#: kernel's tick count plus the boot time, which a clock step can move by a little between calls.
START_TOLERANCE_S = 1.0
#: Pidfiles written by fedseek 0.1 hold the kernel start time in clock ticks since boot, not epoch seconds.
_TICKS_BELOW = 1e9


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on `host` (loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until host:port accepts TCP connections; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before listening on {host}:{port}")
        if port_open(host, port, 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


def start_time(pid: int) -> float | None:
    """Start time of a live pid (epoch seconds), or None: with the pid it names one process for good."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _matches(created: float, started: float) -> bool:
    """Does a process created at `created` (epoch seconds) have the recorded start time `started`?"""
    if 0 < started < _TICKS_BELOW:  # an older pidfile: clock ticks since boot
        return abs(created - psutil.boot_time() - started / os.sysconf("SC_CLK_TCK")) < START_TOLERANCE_S
    return abs(created - started) < START_TOLERANCE_S


def _same_start(proc: psutil.Process, started: float) -> bool:
    try:
        return _matches(proc.create_time(), started)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def is_running(pid: int, started: float) -> bool:
    """True if `pid` is alive, not a zombie, and is the process that started at `started` (not a recycled pid)."""
    try:
        proc = psutil.Process(pid)
    except (psutil.NoSuchProcess, ValueError):
        return False
    return _same_start(proc, started) and _live(proc)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def members(known: dict[int, float], sid: int | None) -> dict[int, float]:
    """The `known` processes that still are who they were, their live descendants, and the members of session `sid`.

    Returns pid -> start time, from one scan of the process table. Orphans whose parent died are
    re-parented to init and are found through the session only.
    """
    table: dict[int, tuple[int, float]] = {}
    for proc in psutil.process_iter(["ppid", "create_time"]):
        if proc.info["create_time"] is not None:
            table[proc.pid] = (proc.info["ppid"], proc.info["create_time"])
    found = {pid: table[pid][1] for pid, started in known.items() if pid in table and _matches(table[pid][1], started)}
    in_session = {pid for pid in table if sid is not None and pid != os.getpid() and _session(pid) == sid}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, created) in table.items():
            if pid not in found and (ppid in found or pid in in_session):
                found[pid] = created
                changed = True
    return found


def _signal_all(pids: Iterable[tuple[int, float]], sig: signal.Signals) -> list[int]:
    hit = []
    for pid, started in pids:
        try:
            proc = psutil.Process(pid)
            if _same_start(proc, started):
                proc.send_signal(sig)
                hit.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return hit


def _reap(pids: Iterable[int]) -> None:
    """Collect our own exited children (daemons started in this process), so they stop being zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def terminate(seen: dict[int, float], timeout_s: float, refresh: Callable[[], dict[int, float]] | None = None) -> list[int]:
    """SIGTERM every process in `seen` that still runs, SIGKILL what is left after `timeout_s`; returns the pids signalled.

    `refresh` (optional) returns late members (e.g. a ServerApp spawned while we waited), which join the set.
    """
    hit: list[int] = []
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        live = {p: s for p, s in seen.items() if is_running(p, s)}
        if not live:
            break
        hit += _signal_all(live.items(), sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(live)
            if not any(is_running(p, s) for p, s in live.items()):
                break
            if refresh is not None:
                seen.update({p: s for p, s in refresh().items() if p not in seen})
            time.sleep(0.05)
    return sorted(set(hit))


class ProcessTree:
    """A started process plus every descendant / session member seen while it ran."""

    def __init__(self, proc: subprocess.Popen, name: str = "") -> None:
        """Track `proc` (started in its own session) from now on."""
        self.proc = proc
        self.name = name
        started = start_time(proc.pid)
        self.started = started if started is not None else time.time()
        self.sid = _session(proc.pid) or proc.pid
        self.seen: dict[int, float] = {proc.pid: self.started}

    @property
    def pid(self) -> int:
        """The started process's pid."""
        return self.proc.pid

    def sample(self) -> None:
        """Record current descendants and session members (call periodically while it runs)."""
        self.seen.update({p: s for p, s in members(self.seen, self.sid).items() if p not in self.seen})

    def alive(self) -> list[int]:
        """Pids we started that still run (start time matches)."""
        return [pid for pid, started in self.seen.items() if is_running(pid, started)]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything we started, then SIGKILL what is left after `timeout_s`."""
        if self.proc.poll() is None:
            self.sample()
        terminate(self.seen, timeout_s)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def start_process(cmd: Sequence[str], *, env: dict[str, str], log: IO[bytes] | None, cwd: str | None = None, name: str = "") -> ProcessTree:
    """Start `cmd` in its own session (so its tree can be found and stopped) with output to `log`."""
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ProcessTree(proc, name)


def stop_detached(pid: int, started: float, timeout_s: float = 15.0) -> list[int]:
    """Stop a daemon started in its own session by an earlier command (pidfile): SIGTERM its tree, SIGKILL leftovers.

    Returns the pids signalled. Only processes whose start time matches are hit; session members
    count only when the daemon leads its session (it was started with start_new_session).
    """
    try:
        if not _same_start(psutil.Process(pid), started):
            return []
    except (psutil.NoSuchProcess, ValueError):
        return []
    sid = pid if _session(pid) == pid else None
    return terminate(members({pid: started}, sid), timeout_s, refresh=lambda: members({pid: started}, sid))


def stop_child(proc: subprocess.Popen, timeout_s: float = 20.0) -> int | None:
    """Stop a child this process started (by its pid): SIGTERM, then SIGKILL after `timeout_s`; its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode
