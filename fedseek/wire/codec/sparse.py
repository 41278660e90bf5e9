"""Which coordinates a codec sends: all of them (dense), the top-k by |value| (per layer or global), or the mask's."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedseek.names import DENSE_CODECS
from fedseek.wire.codec.spec import CodecSpec
from fedseek.wire.mask_bits import find_mask


def flat_masks(
    u: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray] | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray | None]:
    """Each tensor's mask, checked and flattened (None: the tensor is sent dense)."""
    assert mask is not None
    out: dict[str, np.ndarray | None] = {}
    for name in u:
        m = find_mask(mask, name)
        if m is None:
            out[name] = None
            continue
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise ValueError(f"mask for {name!r} must be a bool array, got dtype {m.dtype}")
        if tuple(m.shape) != shapes[name]:
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, update has {shapes[name]}")
        out[name] = m.ravel()
    return out


def select(u: Mapping[str, np.ndarray], spec: CodecSpec, masks_flat: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """Which flat indices each tensor sends (sorted int64), or None for all of them."""
    if spec.kind in DENSE_CODECS:
        return dict.fromkeys(u)
    if spec.kind == "sparse_mask":
        return {k: (None if (m := masks_flat.get(k)) is None else np.flatnonzero(m)) for k in u}
    if spec.topk_scope == "layer":
        out: dict[str, np.ndarray | None] = {}
        for name, vec in u.items():
            k = min(vec.size, math.ceil(spec.topk_fraction * vec.size))
            out[name] = topk_indices(np.abs(vec), k)
        return out
    return _global_topk(u, spec.topk_fraction)


def _global_topk(u: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray | None]:
    """ceil(fraction * N) largest |values| over all tensors together, split back per tensor (a tensor may get none)."""
    names = list(u)
    sizes = [u[n].size for n in names]
    total = int(sum(sizes))
    k = min(total, math.ceil(fraction * total))
    allabs = np.concatenate([np.abs(u[n]) for n in names]) if names else np.zeros(0, np.float32)
    chosen = topk_indices(allabs, k)
    bounds = np.cumsum([0] + sizes)
    out: dict[str, np.ndarray | None] = {}
    for i, name in enumerate(names):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        a, b = np.searchsorted(chosen, [lo, hi])
        out[name] = chosen[a:b] - lo
    return out


def topk_indices(absval: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of exactly k largest entries of `absval` (ties broken deterministically)."""
    n = absval.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(-absval, k - 1)[:k]
    return np.sort(part).astype(np.int64)
