"""The sparsity mask on the wire: 1 bit per coordinate, its digest, and lookup by canonical tensor name."""

from __future__ import annotations

import hashlib
import json
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


def mask_digest(mask: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a mask (canonical names, shapes, bits) so both sides can prove they hold the same one."""
    h = hashlib.sha256(b"fedseek-mask-v1")
    for name in sorted(canonical_name(k) for k in mask):
        arr = np.asarray(find_mask(mask, name))
        h.update(name.encode() + b"\0" + json.dumps(list(arr.shape)).encode() + b"\0")
        h.update(np.packbits(arr.astype(bool).ravel(), bitorder="little").tobytes())
    return h.hexdigest()


def find_mask(mask: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """Look up a mask entry by canonical name, tolerating ``_module.`` prefixes on either side (None: unmasked)."""
    if name in mask:
        return mask[name]
    canon = canonical_name(name)
    for k, v in mask.items():
        if canonical_name(k) == canon:
            return v
    return None
