"""A site's held-out evaluation split: which records are never trained on, decided once per record.

Each record goes to the held-out side iff HMAC-SHA256(key, record bytes) falls below the
holdout fraction. The assignment is a fixed function of the record itself, so adding or
removing one record never moves another across the line: training and evaluation sets stay
disjoint across rounds, runs and data growth, which is what parallel composition needs
(per record, the guarantee is the larger of the training and the evaluation epsilon).
The key is drawn once from the OS CSPRNG and kept in the site's state dir (0600);
seed-reproducible simulations without DP may derive it from the run seed instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import numpy as np

from fedseek.files import atomic_write_bytes

KEY_FILE = "holdout.key"
_SCALE = float(2**64)


def holdout_key(state_dir: str | Path, *, seed: int | None = None) -> bytes:
    """The site's holdout key: derived from `seed` when given, else read from (or created once in) STATE_DIR/holdout.key."""
    if seed is not None:
        return hashlib.sha256(f"fedseek-holdout-{int(seed)}".encode()).digest()
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_bytes(path, os.urandom(32), mode=0o600, overwrite=False)
        except FileExistsError:
            pass  # another process created it first: use theirs
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"holdout key {path} is damaged ({len(key)} bytes, expected 32): restore it, or use a new state dir")
    return key


def holdout_mask(x: np.ndarray, y: np.ndarray, fraction: float, key: bytes) -> np.ndarray:
    """Boolean mask of the held-out records (True = evaluation only, never trained on)."""
    if fraction <= 0.0 or len(y) == 0:
        return np.zeros(len(y), dtype=bool)
    xs = np.ascontiguousarray(x, dtype=np.float32).reshape(len(y), -1)
    ys = np.ascontiguousarray(y, dtype=np.int64)
    draws = np.empty(len(y), dtype=np.float64)
    for i in range(len(y)):
        digest = hmac.new(key, xs[i].tobytes() + ys[i].tobytes(), hashlib.sha256).digest()
        draws[i] = int.from_bytes(digest[:8], "little") / _SCALE
    return draws < float(fraction)
