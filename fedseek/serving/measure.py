"""Model size and CPU latency, measured the same way by the distillation report and the benchmarks."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np


def model_bytes(model: Any) -> int:
    """Bytes of the model's weights as fedseek saves them (torch.save of the state dict)."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def latency_ms(model: Any, x: np.ndarray, batch: int, calls: int = 30) -> float:
    """Median CPU latency of one forward pass over `batch` rows (after 5 warm-up calls)."""
    import torch

    xb = torch.as_tensor(np.resize(x, (batch, *x.shape[1:])), dtype=torch.float32)
    times = []
    with torch.no_grad():
        for i in range(calls + 5):
            t0 = time.perf_counter()
            model(xb)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))
