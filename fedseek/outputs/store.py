"""Run outputs (a stable contract): metrics.jsonl, summary.json, model.pt (+ model.json), checkpoint/.

Every write is atomic (temp file + fsync + rename) or an fsync'd append, so a crash leaves
the last complete round on disk, never a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.files import atomic_write_bytes, atomic_write_json, jsonable


class RunOutputs:
    """The files of one run directory."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary_path = self.dir / "summary.json"
        self.model_path = self.dir / "model.pt"
        self.model_meta_path = self.dir / "model.json"
        self.checkpoint_dir = self.dir / "checkpoint"

    def reset_metrics(self) -> None:
        """Start a fresh metrics.jsonl (a new run in an existing directory)."""
        self.metrics_path.unlink(missing_ok=True)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round as a JSON line, fsync'd so a reader never sees a partial line."""
        line = json.dumps(jsonable(row)) + "\n"
        with open(self.metrics_path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (a crash between the metrics line and the checkpoint)."""
        rows = [r for r in read_metrics(self.metrics_path) if int(r.get("round", 0)) <= last_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows).encode())

    def audit(self, event: str, **fields: Any) -> None:
        """Append one structured audit event to audit.jsonl (fsync'd)."""
        import time

        line = json.dumps(jsonable({"time": time.time(), "event": event, **fields})) + "\n"
        with open(self.dir / "audit.jsonl", "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def save_model(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
        """model.pt is a plain torch state_dict; model.json says how to rebuild the module."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, buf)
        atomic_write_bytes(self.model_path, buf.getvalue())
        atomic_write_json(self.model_meta_path, meta)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, ignoring a trailing partial line."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class PrometheusMetrics:
    """The coordinator's Prometheus metrics (own registry), served on host:port while the run lives."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, run: str = "") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.round = Gauge("fedseek_round", "last completed round", **labels)
        self.participants = Gauge("fedseek_round_participants", "sites whose update was aggregated this round", **labels)
        self.sampled = Gauge("fedseek_round_sampled", "sites asked to train this round", **labels)
        self.round_seconds = Gauge("fedseek_round_seconds", "wall time of the last round", **labels)
        self.accuracy = Gauge("fedseek_accuracy", "central test accuracy of the global model", **labels)
        self.loss = Gauge("fedseek_loss", "central test loss of the global model", **labels)
        self.rejected = Counter("fedseek_rejected_updates", "updates rejected by validation", ["reason"], **labels)
        self.refused = Counter("fedseek_refused_rounds", "rounds refused by sites (privacy budget)", **labels)
        self.failed = Counter("fedseek_failed_replies", "error replies and time-outs", **labels)
        self.bytes = Counter("fedseek_bytes", "payload bytes on the wire", ["direction"], **labels)
        self.epsilon = Gauge("fedseek_site_epsilon", "privacy spent per site (its ledger, as reported)", ["site"], **labels)
        self.wm_p = Gauge("fedseek_watermark_p_value", "watermark p-value after embedding", **labels)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, int(self.server.server_port)

    def observe_round(self, row: dict[str, Any]) -> None:
        """Update every metric from one metrics.jsonl row."""
        self.round.set(row["round"])
        self.participants.set(row.get("accepted", 0))
        self.sampled.set(row.get("sampled", 0))
        self.round_seconds.set(row.get("round_seconds", 0.0))
        central = row.get("central") or {}
        if "accuracy" in central:
            self.accuracy.set(central["accuracy"])
            self.loss.set(central["loss"])
        for r in row.get("rejections", []):
            self.rejected.labels(reason=str(r.get("reason", "")).split(" ")[0][:40]).inc()
        self.refused.inc(row.get("refused", 0))
        self.failed.inc(row.get("failed", 0) + row.get("timed_out", 0))
        self.bytes.labels(direction="up").inc(row.get("bytes_up", 0))
        self.bytes.labels(direction="down").inc(row.get("bytes_down", 0))
        for site, view in (row.get("sites") or {}).items():
            if view.get("epsilon") is not None:
                self.epsilon.labels(site=site).set(view["epsilon"])
        if row.get("watermark"):
            self.wm_p.set(row["watermark"]["p_value"])

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
