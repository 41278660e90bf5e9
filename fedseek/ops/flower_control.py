"""Submitting a run to a SuperLink and following it to its real end status.

`flwr run --stream` exits 0 even when the ServerApp fails (measured), so fedseek submits with
`flwr run --format json`, then polls the run's status through Flower's Control API and
reports failure unless the run ends `finished:completed`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def flwr_bin(name: str) -> str:
    """Path of a Flower console script installed next to this interpreter."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def write_connection(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> None:
    """Write $FLWR_HOME/config.toml with one SuperLink connection (insecure unless a CA is given)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


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


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escaping is valid TOML)."""
    return json.dumps(value)


def submit_run(app_dir: Path, connection: str, env: dict[str, str], run_config: dict[str, str | int | float | bool], federation_config: dict[str, int | float] | None = None) -> int:
    """`flwr run APP CONN --format json`; returns the run id or raises RuntimeError with Flower's message."""
    rc = " ".join(f"{k}={toml_str(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}" for k, v in run_config.items())
    cmd = [flwr_bin("flwr"), "run", str(app_dir), connection, "--format", "json", "--run-config", rc]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    payload = _last_json(res.stdout)
    if res.returncode != 0 or not payload or not payload.get("success"):
        detail = (payload or {}).get("error-message") or (res.stderr or res.stdout).strip()[-800:]
        raise RuntimeError(f"flwr run failed: {detail}")
    return int(payload["run-id"])


def _last_json(text: str) -> dict | None:
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


@dataclass
class RunStatus:
    """A run's status as the SuperLink reports it."""

    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def ok(self) -> bool:
        return self.status == "finished" and self.sub_status == "completed"

    def __str__(self) -> str:
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


class ControlClient:
    """Flower's Control API client for one connection (reads $FLWR_HOME/config.toml)."""

    def __init__(self, flwr_home: Path, connection: str) -> None:
        os.environ["FLWR_HOME"] = str(flwr_home)
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        self._client = init_http_client_from_connection(read_superlink_connection(connection))

    def status(self, run_id: int) -> RunStatus:
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
        from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=E0611

        self._client.StopRun(StopRunRequest(run_id=run_id))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass
