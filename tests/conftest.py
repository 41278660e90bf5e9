"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests run on 2 cores next to Ray actors: keep torch to one thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write a YAML text into tmp_path and return its path."""

    def _write(text: str, name: str = "cfg.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write



@contextlib.contextmanager
def flower_task_identity() -> Iterator[None]:
    """Flower Messages need the process' task identity (Flower sets it inside a ServerApp/ClientApp process)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def task_identity() -> Iterator[None]:
    """A test's Flower task identity (see flower_task_identity)."""
    with flower_task_identity():
        yield
