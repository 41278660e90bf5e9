"""Shared test helpers."""

from __future__ import annotations

import os
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
