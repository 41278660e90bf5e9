"""Run outputs (a stable contract): metrics.jsonl, summary.json, model.pt + model_last.pt (+ model.json), checkpoint/.

Every write is atomic (temp file + fsync + rename) or an fsync'd append, so a crash leaves
the last complete round on disk, never a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.files import append_line, atomic_write_bytes, atomic_write_json, jsonable
from fedseek.outputs.schema import MetricsRow, RunSummary, dump, read_rows


class RunOutputs:
    """The files of one run directory."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary_path = self.dir / "summary.json"
        self.model_path = self.dir / "model.pt"
        self.model_meta_path = self.dir / "model.json"
        self.last_model_path = self.dir / "model_last.pt"
        self.checkpoint_dir = self.dir / "checkpoint"

    def reset_metrics(self) -> None:
        """Start a fresh metrics.jsonl (a new run in an existing directory)."""
        self.metrics_path.unlink(missing_ok=True)

    def append_metrics(self, row: MetricsRow) -> None:
        """Append one round as a JSON line, fsync'd so a reader never sees a partial line."""
        append_line(self.metrics_path, json.dumps(jsonable(dump(row))))

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after `last_round` (a crash between the metrics line and the checkpoint)."""
        rows = [r for r in read_rows(self.metrics_path) if r.round <= last_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(jsonable(dump(r))) + "\n" for r in rows).encode())

    def audit(self, event: str, **fields: Any) -> None:
        """Append one structured audit event to audit.jsonl (fsync'd)."""
        import time

        append_line(self.dir / "audit.jsonl", json.dumps(jsonable({"time": time.time(), "event": event, **fields})))

    def write_summary(self, summary: RunSummary) -> None:
        """summary.json, atomically."""
        atomic_write_json(self.summary_path, dump(summary))

    def save_model(self, state_dict: dict[str, Any], meta: dict[str, Any], last: dict[str, Any] | None = None) -> None:
        """model.pt (the kept round) and model_last.pt (the last round; `last` None: the same weights) as plain torch
        state_dicts; model.json, the model card, says how to rebuild and use them."""
        import io

        import torch

        def blob(arrays: dict[str, Any]) -> bytes:
            buf = io.BytesIO()
            torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}, buf)
            return buf.getvalue()

        kept = blob(state_dict)
        atomic_write_bytes(self.model_path, kept)
        atomic_write_bytes(self.last_model_path, kept if last is None else blob(last))
        atomic_write_json(self.model_meta_path, meta)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows as plain dicts (validated by the schema; a trailing partial line is ignored)."""
    return [dump(r) for r in read_rows(path)]
