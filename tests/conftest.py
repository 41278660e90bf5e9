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


#: The test files that take longest (measured serially on 2 cores, seconds, this session), heaviest first. With
#: `pytest -n 2 --dist loadfile` (make check / make test) each worker takes whole files in collection order, so the
#: heavy ones are started first and the many short files fill the gaps at the end instead of one long file running
#: alone after the other worker has finished. Unlisted files keep their place after these.
HEAVY_FILES = ("test_simulation.py", "test_reliability.py", "test_deploy_hostile.py", "test_deploy.py", "test_site_loss.py",
               "test_own_data.py", "test_deploy_resume.py", "test_ray_cluster.py", "test_watermark.py", "test_transport.py",
               "test_regression_scaling.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the heaviest test files first (a stable sort: the order inside each file is kept)."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))
