"""Talking to a SuperLink through Flower's Control API: connection files, submitting a run, its status and logs.

`flwr run --stream` exits 0 even when the ServerApp fails (measured), so fedseek submits the
run itself (the FAB built by Flower's own `build_fab_from_disk`, as `flwr run` does), then
polls the run's status through the Control API and reports failure unless the run ends
`finished:completed`. Doing this in-process saves the start of two `flwr` CLI processes
(`flwr run`, `flwr log --stream`) per run, ~2 s of CPU each on the cores the run itself needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedseek.files import atomic_write_bytes

RunConfigValue = str | int | float | bool


def flwr_bin(name: str) -> str:
    """Path of a Flower console script installed next to this interpreter."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def write_connection(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> None:
    """Write $FLWR_HOME/config.toml with one SuperLink connection (insecure unless a CA is given)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    else:
        lines.append("insecure = true")
    atomic_write_bytes(flwr_home / "config.toml", ("\n".join(lines) + "\n").encode(), mode=0o644)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our FLWR_HOME, no telemetry, no update check, no runtime pip."""
    env = os.environ.copy()
    # Flower spawns flower-superexec / flwr-simulation by name: our interpreter's bin dir comes first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    return env


@dataclass
class RunStatus:
    """A run's status as the SuperLink reports it."""

    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str

    @property
    def finished(self) -> bool:
        """The run ended (whatever the outcome)."""
        return self.status == "finished"

    @property
    def ok(self) -> bool:
        """The run ended and completed."""
        return self.status == "finished" and self.sub_status == "completed"

    def __str__(self) -> str:
        """status:sub_status, as Flower prints it."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def build_fab(app_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """The Flower App Bundle of `app_dir` and its pyproject config, exactly as `flwr run APP` builds it."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _warnings = load_and_validate(app_dir / "pyproject.toml")
    return build_fab_from_disk(app_dir), config


class ControlClient:
    """Flower's Control API client for one connection (reads $FLWR_HOME/config.toml)."""

    def __init__(self, flwr_home: Path, connection: str, *, quiet: bool = False) -> None:
        """Connect; `quiet` hides Flower's "Using SuperLink: ..." line (stdout, which would break --json)."""
        os.environ["FLWR_HOME"] = str(flwr_home)
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            self._conn = read_superlink_connection(connection)
            self._client = init_http_client_from_connection(self._conn)

    def start_run(self, app_dir: Path, run_config: dict[str, RunConfigValue],
                  federation_config: dict[str, int | float] | None = None) -> int:
        """Submit the app in `app_dir` with run-config overrides; returns the run id or raises RuntimeError."""
        import click
        from flwr.cli.utils import flwr_cli_exc_handler
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
        from flwr.supercore.fab import Fab
        from flwr.supercore.utils import simulation_config_from_json

        try:
            fab_bytes, _config = build_fab(app_dir)
            fed = simulation_config_from_json({k.replace("-", "_"): v for k, v in federation_config.items()}) if federation_config else None
            req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
                                  override_config=user_config_to_proto(dict(run_config)), federation=self._conn.federation or "",
                                  override_federation_config=fed, app_spec="")
            with flwr_cli_exc_handler():
                res = self._client.StartRun(req)
        except click.ClickException as exc:
            raise RuntimeError(f"flwr run failed: {exc.format_message()}") from None
        except (ValueError, OSError) as exc:
            raise RuntimeError(f"flwr run failed: {exc}") from None
        if not res.HasField("run_id"):
            raise RuntimeError("flwr run failed: Failed to start run")
        return int(res.run_id)

    def status(self, run_id: int) -> RunStatus:
        """The run's current status."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        res = self._client.ListRuns(ListRunsRequest(run_id=run_id))
        run = run_from_proto(res.run_dict[run_id])
        return RunStatus(run.status.status, run.status.sub_status, run.status.details or "")

    def nodes(self) -> list[dict]:
        """Registered SuperNodes: node_id, name, status, public_key (PEM bytes), online_until."""
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

        res = self._client.ListNodes(ListNodesRequest())
        return [{"node_id": int(n.node_id), "name": n.name, "status": n.status, "public_key": bytes(n.public_key),
                 "last_activated_at": n.last_activated_at, "online_until": float(n.online_until)} for n in res.nodes_info]

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop the run."""
        from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=E0611

        self._client.StopRun(StopRunRequest(run_id=run_id))

    def stream_logs(self, run_id: int, sink: BinaryIO) -> None:
        """Write the run's log (ServerApp output) to `sink` as the SuperLink streams it, until the run ends."""
        from flwr.proto.control_pb2 import StreamLogsRequest  # pylint: disable=E0611

        for res in self._client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            sink.write(res.log_output.encode())
            sink.flush()

    def close(self) -> None:
        """Close the HTTP client (errors ignored: it may be closed twice, or from another thread)."""
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


class RunLog:
    """OUT/run.log: the run's log streamed by a background thread on its own Control API client."""

    def __init__(self, flwr_home: Path, connection: str, run_id: int, path: Path) -> None:
        """Start streaming run `run_id` into `path` (appended)."""
        self.ended = threading.Event()  # set when the SuperLink ended the stream: the run has finished
        self._client = ControlClient(flwr_home, connection, quiet=True)
        self._fh = open(path, "ab")  # closed by stop()
        self._thread = threading.Thread(target=self._run, args=(run_id,), name="fedseek-run-log", daemon=True)
        self._thread.start()

    def _run(self, run_id: int) -> None:
        try:
            self._client.stream_logs(run_id, self._fh)
        except Exception:  # noqa: BLE001 - the SuperLink went away or the client was closed: the log simply ends
            return
        self.ended.set()

    def stop(self, wait_s: float = 2.0) -> None:
        """Let the stream drain for up to `wait_s` (it ends with the run), then close it."""
        self._thread.join(timeout=wait_s)
        self._client.close()
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            self._fh.close()
