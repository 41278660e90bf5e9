"""Error feedback: what a lossy codec dropped in one round is carried into the site's next update."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


class ErrorFeedback:
    """Per-site error-feedback memory e_t = u - decode(encode(u)), u = Δ_t + e_{t-1} (post-processing).

    Keep one per site for the whole run and persist it with `state_dict()` (numpy arrays only,
    safe to save with np.savez; never unpickle state received from elsewhere).
    """

    def __init__(self) -> None:
        """Start with an empty (all-zero) memory."""
        self.residual: dict[str, np.ndarray] = {}

    def add_to(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return u = update + residual (float32, new arrays); residual shapes must match."""
        out: dict[str, np.ndarray] = {}
        for name, x in update.items():
            r = self.residual.get(name)
            if r is None:
                out[name] = np.array(x, dtype=np.float32, copy=True)
            else:
                if r.shape != x.shape:
                    raise ValueError(f"error-feedback residual for {name!r} has shape {r.shape}, update has {x.shape}")
                out[name] = (x.astype(np.float32, copy=False) + r).astype(np.float32, copy=False)
        return out

    def set_residual(self, name: str, value: np.ndarray) -> None:
        """Store the new residual for one tensor (float32 copy)."""
        self.residual[name] = np.array(value, dtype=np.float32, copy=True)

    def norm(self) -> float:
        """L2 norm of the whole memory: telemetry for how much update is still pending."""
        return float(math.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in self.residual.values())))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The memory as {tensor name: float32 array} copies, for checkpoints."""
        return {k: v.copy() for k, v in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from `state_dict()` output; rejects non-numeric or non-finite arrays."""
        new: dict[str, np.ndarray] = {}
        for k, v in state.items():
            arr = np.asarray(v)
            if not isinstance(k, str) or arr.dtype.kind not in "fiu":
                raise ValueError(f"error-feedback state entry {k!r} is not a numeric array (dtype {arr.dtype})")
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"error-feedback state entry {k!r} has non-finite values")
            new[k] = arr
        self.residual = new
