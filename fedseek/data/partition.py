"""Simulation partitioning of one dataset across N virtual sites, via flwr-datasets partitioners.

Each Flower ClientApp call recomputes its own partition, so results are cached in-process
(keyed on a hash of the labels/groups and the parameters) and are fully determined by `seed`.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from fedseek.names import PARTITION_SCHEMES


class _ArrayKey:
    """Hashable stand-in for (labels, groups): compares by content digest so lru_cache can key on it."""

    __slots__ = ("labels", "groups", "digest")

    def __init__(self, labels: np.ndarray, groups: np.ndarray | None) -> None:
        """Keep read-only copies and hash their bytes, dtype and shape."""
        self.labels = np.array(labels, copy=True)
        self.labels.setflags(write=False)
        self.groups = None if groups is None else np.array(groups, copy=True)
        if self.groups is not None:
            self.groups.setflags(write=False)
        h = hashlib.blake2b(digest_size=16)
        for arr in (self.labels, self.groups):
            if arr is None:
                h.update(b"none")
                continue
            h.update(str((arr.dtype.str, arr.shape)).encode())
            if arr.dtype == object:
                h.update(repr(arr.tolist()).encode())
            else:
                h.update(np.ascontiguousarray(arr).tobytes())
        self.digest = h.digest()

    def __hash__(self) -> int:
        """Hash of the content digest."""
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        """Equal when the content digests match."""
        return isinstance(other, _ArrayKey) and other.digest == self.digest


def _hf_dataset(labels: np.ndarray, order: np.ndarray) -> Any:  # datasets.Dataset (imported lazily)
    """A Hugging Face Dataset of just {"idx", "label"}, rows in the given (seeded) order."""
    import datasets

    return datasets.Dataset.from_dict(
        {"idx": order.astype(np.int64), "label": labels[order].astype(np.int64)}
    )


def _read_indices(partitioner: Any, num_partitions: int) -> list[np.ndarray]:
    """Original row indices of every partition, read back from the partitioner's "idx" column."""
    out = []
    for pid in range(num_partitions):
        part = partitioner.load_partition(pid)
        out.append(np.sort(np.asarray(part["idx"], dtype=np.int64)))
    return out


def _encode_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as int64 codes 0..K-1 (Arrow columns need one concrete type)."""
    _, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


@lru_cache(maxsize=32)
def _partition_cached(
    key: _ArrayKey,
    num_partitions: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_partition_size: int,
) -> tuple[np.ndarray, ...]:
    """The actual partitioning; results are read-only and shared between cache hits."""
    n = key.labels.shape[0]
    if scheme == "natural":
        parts = _natural(key.groups, num_partitions)  # type: ignore[arg-type]
    else:
        from flwr_datasets.partitioner import (
            DirichletPartitioner,
            IidPartitioner,
            LinearPartitioner,
        )

        labels = _encode_labels(key.labels)
        # IID and size partitioners cut contiguous blocks, so the rows are shuffled first
        # (seeded); this also randomizes which same-class rows Dirichlet hands to whom.
        order = np.random.default_rng(seed).permutation(n)
        if scheme == "iid":
            partitioner = IidPartitioner(num_partitions=num_partitions)
        elif scheme == "quantity":
            partitioner = LinearPartitioner(num_partitions=num_partitions)
        else:  # dirichlet
            partitioner = DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                alpha=alpha,
                min_partition_size=min_partition_size,
                self_balancing=False,
                shuffle=True,
                seed=seed,
            )
        partitioner.dataset = _hf_dataset(labels, order)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flwr warns on each Dirichlet resample
                parts = _read_indices(partitioner, num_partitions)
        except ValueError as exc:
            raise ValueError(
                f"{scheme} partitioning of {n} rows into {num_partitions} partitions failed "
                f"(alpha={alpha}, min_partition_size={min_partition_size}): {exc}"
            ) from None
    sizes = [p.size for p in parts]
    if min(sizes) < min_partition_size:
        raise ValueError(
            f"{scheme} partitioning of {n} rows into {num_partitions} partitions gives a "
            f"partition of {min(sizes)} rows (< min_partition_size={min_partition_size}); "
            f"use fewer partitions"
        )
    for p in parts:
        p.setflags(write=False)
    return tuple(parts)


def _natural(groups: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Rows of group g go to partition g % num_partitions (non-integer groups: sorted codes)."""
    if np.issubdtype(groups.dtype, np.integer) and (groups.size == 0 or groups.min() >= 0):
        codes = groups.astype(np.int64)
    else:
        _, codes = np.unique(groups, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
    target = codes % num_partitions
    return [np.flatnonzero(target == p).astype(np.int64) for p in range(num_partitions)]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split row indices 0..N-1 into `num_partitions` sorted, disjoint index arrays (one per site).

    Schemes: "iid" (uniform random, equal sizes; flwr IidPartitioner on seeded-shuffled rows),
    "dirichlet" (label skew: per class, shares ~ Dir(alpha); smaller alpha = more skew;
    flwr DirichletPartitioner), "quantity" (size skew: partition i gets a share proportional
    to i+1; flwr LinearPartitioner on seeded-shuffled rows), "natural" (by `groups`, e.g.
    the bank id: group g -> partition g % num_partitions). For iid/dirichlet/quantity every
    index is used exactly once; for natural too, given groups. Same inputs and seed give the
    same partitions (cached in-process); the returned arrays are copies the caller may modify.
    """
    labels = np.asarray(labels).reshape(-1)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}")
    n = labels.shape[0]
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > n:
        raise ValueError(f"num_partitions ({num_partitions}) exceeds the number of rows ({n})")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be > 0 for dirichlet partitioning, got {alpha}")
    if scheme == "natural":
        if groups is None:
            raise ValueError("scheme 'natural' needs `groups` (one group id per row)")
        groups = np.asarray(groups).reshape(-1)
        if groups.shape[0] != n:
            raise ValueError(f"groups has {groups.shape[0]} entries, expected {n}")
    else:
        groups = None  # irrelevant to the result: keep it out of the cache key
    alpha_key = float(alpha) if scheme == "dirichlet" else 0.0
    parts = _partition_cached(
        _ArrayKey(labels, groups), int(num_partitions), scheme, alpha_key, int(seed),
        int(min_partition_size),
    )
    return [p.copy() for p in parts]
