"""Starting and stopping the Flower daemons fedseek launches, by process id, never by name.

Ray and Flower spawn grandchildren that outlive their parents (orphaned raylet/agents were
measured after killing a SuperLink), so a `ProcessTree` keeps sampling the descendants and the
session of the process it started and, on stop, terminates every one it saw (pid + start time
checked, so a recycled pid is never hit).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on `host` (loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until host:port accepts TCP connections; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) of a live pid from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    # fields after comm: state(0) ppid(1) pgrp(2) session(3) ... starttime(19)
    return int(rest[1]), int(rest[3]), int(rest[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class ProcessTree:
    """A started process plus every descendant / session member seen while it ran."""

    def __init__(self, proc: subprocess.Popen, name: str = "") -> None:
        self.proc = proc
        self.name = name
        self.seen: dict[int, int] = {}  # pid -> start time
        st = _stat(proc.pid)
        if st:
            self.seen[proc.pid] = st[2]
        self.sid = st[1] if st else proc.pid

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self) -> None:
        """Record current descendants and session members (call periodically while it runs)."""
        table = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None}
        frontier = set(self.seen) | {self.proc.pid}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, sid, start) in table.items():
                if pid not in self.seen and (ppid in frontier or sid == self.sid):
                    self.seen[pid] = start
                    frontier.add(pid)
                    changed = True

    def alive(self) -> list[int]:
        """Pids we started that still run (start time matches)."""
        out = []
        for pid, start in self.seen.items():
            st = _stat(pid)
            if st is not None and st[2] == start:
                out.append(pid)
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything we started, then SIGKILL what is left after `timeout_s`."""
        if self.proc.poll() is None:
            self.sample()
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            pids = self.alive()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.alive():
                try:
                    self.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
                # reap our own zombie children
                for pid in self.alive():
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                time.sleep(0.1)
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


def start_time(pid: int) -> int | None:
    """Kernel start time of a live pid (clock ticks since boot), or None: with the pid it names one process for good."""
    st = _stat(pid)
    return st[2] if st else None


def is_running(pid: int, started: int) -> bool:
    """True if `pid` is alive, not a zombie, and is the process that started at `started` (not a recycled pid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = raw[raw.rfind(")") + 2 :].split()[0]
    return state not in ("Z", "X") and start_time(pid) == started


def _detached_members(pid: int, started: int) -> dict[int, int]:
    """The daemon, its descendants and its session members (pid -> start time), if the daemon is who we think."""
    if start_time(pid) != started:
        return {}
    table = {p: st for p in _all_pids() if (st := _stat(p)) is not None}
    sid = table[pid][1] if pid in table else pid
    members = {pid: started}
    changed = True
    while changed:
        changed = False
        for p, (ppid, psid, pstart) in table.items():
            if p not in members and (ppid in members or (psid == sid and sid == pid)):
                members[p] = pstart
                changed = True
    return members


def stop_detached(pid: int, started: int, timeout_s: float = 15.0) -> list[int]:
    """Stop a daemon started in its own session by an earlier command (pidfile): SIGTERM its tree, SIGKILL leftovers.

    Returns the pids signalled. Only processes whose start time matches what was sampled are hit.
    """
    members = _detached_members(pid, started)
    hit: list[int] = []
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        live = {p: s for p, s in members.items() if is_running(p, s)}
        if not live:
            break
        for p in live:
            try:
                os.kill(p, sig)
                hit.append(p)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for p in live:  # reap any that are our own children (tests start daemons in-process)
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass
            if not any(is_running(p, s) for p, s in live.items()):
                break
            # late children (e.g. a ServerApp spawned while we waited) join the set
            members.update({p: s for p, s in _detached_members(pid, started).items() if p not in members})
            time.sleep(0.1)
    return sorted(set(hit))
