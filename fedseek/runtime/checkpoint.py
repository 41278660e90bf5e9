"""Crash-safe checkpoints: every stateful part's state_dict() in ONE file, replaced atomically after each round.

Like Opacus' accountants, each stateful part of the coordinator (global model, strategy with
its sampling RNG, watermark stage, run book) exposes state_dict()/load_state_dict(); a
checkpoint simply collects them, so adding state never touches this file.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from fedseek.files import atomic_write_bytes, atomic_write_json

VERSION = 3  # 3: node tracking (identity, back-off) and influence bounds joined the parts


class Stateful(Protocol):
    """What a checkpoint collects."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save(directory: Path, rnd: int, run_id: str, parts: Mapping[str, Stateful], extra: Mapping[str, Any]) -> None:
    """Write checkpoint/state.pt (torch.save of plain data) and a small human-readable state.json."""
    state = {"version": VERSION, "round": rnd, "run_id": run_id, **extra, "parts": {k: p.state_dict() for k, p in parts.items()}}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(directory / "state.pt", buf.getvalue())
    atomic_write_json(directory / "state.json", {"round": rnd, "run_id": run_id, "time": time.time()})


def load(directory: Path, parts: Mapping[str, Stateful]) -> dict[str, Any] | None:
    """Restore every part from checkpoint/state.pt; returns the checkpoint's other fields, None when there is none.

    The file is our own (written by `save` in this run directory), so weights_only=False is safe here.
    """
    path = directory / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has layout version {state.get('version')}, this fedseek reads {VERSION}: start a new run")
    for name, part in parts.items():
        part.load_state_dict(state["parts"][name])
    return {k: v for k, v in state.items() if k != "parts"}
