"""Detached daemons (the coordinator's SuperLink and gateway, a site's SuperNode): pidfiles, start, stop.

A daemon is started in its own session with stdin closed and its output appended to a log,
and is named by a pidfile holding its pid and start time, so a later `fedseek ... stop` (another
process) stops exactly it and its tree, never a recycled pid and never anything by name.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedseek.files import atomic_write_bytes
from fedseek.ops.processes import is_running, start_time, stop_detached

SUPERLINK_PIDFILE = "superlink.pid"
SUPERNODE_PIDFILE = "supernode.pid"
GATEWAY_PIDFILE = "gateway.pid"
ENDPOINT_PIDFILE = "endpoint.pid"
PROXY_PIDFILE = "proxy.pid"


class DeployError(RuntimeError):
    """A deployment step failed; one line for the operator, with the CLI exit code (2 = fix the config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        """Keep the message and the exit code the CLI should return."""
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Pidfile:
    """A detached daemon: pid + start time (so a recycled pid is never mistaken for it)."""

    pid: int
    started: float
    cmd: list[str]
    address: str = ""
    log: str = ""

    @classmethod
    def read(cls, path: Path) -> Pidfile | None:
        """The pidfile at `path`, or None if absent or unreadable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write atomically and durably (0644)."""
        atomic_write_bytes(path, (json.dumps(asdict(self)) + "\n").encode(), mode=0o644)

    def running(self) -> bool:
        """True while the very process we started is alive."""
        return is_running(self.pid, self.started)


def launch_detached(cmd: list[str], env: dict[str, str], log_path: Path, pidfile: Path, address: str) -> tuple[subprocess.Popen, Pidfile]:
    """Start `cmd` detached (own session, stdin closed, output appended to `log_path`) and write its pidfile."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} fedseek starts: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=str(pidfile.parent), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    pf = Pidfile(proc.pid, start_time(proc.pid) or 0.0, cmd, address, str(log_path))
    pf.write(pidfile)
    return proc, pf


def stop_pidfile(path: Path, timeout_s: float = 20.0) -> Pidfile | None:
    """Stop the daemon a pidfile names (whole tree) and remove the pidfile; None if it was not running."""
    pf = Pidfile.read(path)
    if pf is None:
        return None
    was_running = pf.running()
    if was_running:
        stop_detached(pf.pid, pf.started, timeout_s)
    path.unlink(missing_ok=True)
    return pf if was_running else None


def running_pidfile(path: Path) -> Pidfile | None:
    """The pidfile at `path` if the daemon it names still runs, else None."""
    pf = Pidfile.read(path)
    return pf if pf is not None and pf.running() else None
