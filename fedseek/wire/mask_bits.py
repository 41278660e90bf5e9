"""The sparsity mask on the wire: 1 bit per coordinate, checked against the expected shapes on arrival."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedseek.naming import canonical_name

Mask = dict[str, np.ndarray]


def pack_mask(mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """1 bit per coordinate (uint8, little bit order) for the downlink: {name: packed}; shapes travel separately."""
    return {canonical_name(k): np.packbits(np.asarray(v, dtype=bool).ravel(), bitorder="little") for k, v in mask.items()}


def unpack_mask(packed: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Mask:
    """Inverse of `pack_mask`, validating byte lengths and padding against the expected shapes."""
    if set(packed) != set(shapes):
        raise ValueError(f"packed mask tensors {sorted(packed)} differ from expected {sorted(shapes)}")
    out: Mask = {}
    for name, raw in packed.items():
        arr = np.asarray(raw)
        shape = tuple(int(d) for d in shapes[name])
        n = math.prod(shape)
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != (n + 7) // 8:
            raise ValueError(f"packed mask {name!r}: expected {(n + 7) // 8} uint8 bytes, got {arr.dtype} {arr.shape}")
        bits = np.unpackbits(arr, bitorder="little")
        if bits[n:].any():
            raise ValueError(f"packed mask {name!r}: padding bits set")
        out[name] = bits[:n].astype(bool).reshape(shape)
    return out
