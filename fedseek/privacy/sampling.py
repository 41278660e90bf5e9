"""Secret Poisson batch selection for DP-SGD, drawn from the operating system's CSPRNG.

Privacy amplification by subsampling holds only if nobody can predict which records a batch
holds. The coordinator knows the run seed, so nothing seeded from it may pick batches: every
inclusion bit here comes from `os.urandom` (the kernel's ChaCha20 CSPRNG). The loader takes
exactly `steps` batches at rate `sample_rate`, the same numbers the ledger charges (Opacus'
own conversion takes int(1/q) batches, one short when 1/(1/k) rounds below k).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

_SCALE = float(2**64)


def secure_uniform(n: int) -> np.ndarray:
    """n independent uniforms in [0, 1) from os.urandom (64 bits each)."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).astype(np.float64) / _SCALE


class SecurePoissonSampler(Sampler[list[int]]):
    """`steps` batches; each record joins each batch independently with probability `sample_rate` (CSPRNG bits)."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int) -> None:
        """Sample over `num_samples` records, `steps` batches per pass."""
        if num_samples <= 0 or not 0.0 < sample_rate <= 1.0 or steps <= 0:
            raise ValueError(f"bad Poisson plan: n={num_samples} q={sample_rate} steps={steps}")
        self.num_samples, self.sample_rate, self.steps = int(num_samples), float(sample_rate), int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(secure_uniform(self.num_samples) < self.sample_rate).tolist()


def plan_sampling(num_records: int, batch_size: int) -> tuple[float, int]:
    """Opacus' plan for one epoch: k = ceil(n/B) batches at sample rate exactly 1/k."""
    k = max(1, -(-int(num_records) // max(1, int(batch_size))))
    return 1.0 / k, k


def secure_poisson_loader(dataset: Dataset, sample_rate: float, steps: int) -> DataLoader:
    """A DataLoader over `dataset` whose batches come from SecurePoissonSampler, with Opacus' empty-batch-aware collate."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
    from torch.utils.data._utils.collate import default_collate

    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    return DataLoader(dataset, batch_sampler=SecurePoissonSampler(len(dataset), sample_rate, steps), collate_fn=collate)  # type: ignore[arg-type]
