"""Index codings of the coordinates top-k sends: uint32, LEB128 delta varints, or a bitmap; decoding validates them."""

from __future__ import annotations

import numpy as np

from fedseek.wire.codec.spec import CodecError


def encode_index(idx: np.ndarray, n: int, coding: str) -> np.ndarray:
    """Encode sorted unique flat indices of a tensor of n elements."""
    if coding == "uint32":
        return idx.astype(np.uint32)
    if coding == "bitmap":
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        return np.packbits(bits, bitorder="little")
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0 since strictly increasing
    return varint_encode(gaps.astype(np.uint64))


def decode_index(name: str, raw: np.ndarray, n: int, count: int, coding: str) -> np.ndarray:
    """Decode and validate top-k indices: exactly `count`, strictly increasing, all < n."""
    if coding == "uint32":
        return _decode_uint32(name, raw, n, count)
    if coding == "bitmap":
        return _decode_bitmap(name, raw, n, count)
    gaps = varint_decode(name, raw)
    if gaps.size != count:
        raise CodecError(f"tensor {name!r}: {gaps.size} delta-coded indices for {count} values")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any(gaps >= n):
        raise CodecError(f"tensor {name!r}: index out of range [0, {n})")
    idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if idx[-1] >= n:
        raise CodecError(f"tensor {name!r}: index out of range [0, {n})")
    return idx


def _decode_uint32(name: str, raw: np.ndarray, n: int, count: int) -> np.ndarray:
    """Plain uint32 indices: exactly `count`, strictly increasing, below n."""
    if raw.size != count:
        raise CodecError(f"tensor {name!r}: {raw.size} indices for {count} values")
    idx = raw.astype(np.int64)
    if count and np.any(np.diff(idx) <= 0):
        raise CodecError(f"tensor {name!r}: indices are not strictly increasing")
    if count and idx[-1] >= n:
        raise CodecError(f"tensor {name!r}: index out of range [0, {n})")
    return idx


def _decode_bitmap(name: str, raw: np.ndarray, n: int, count: int) -> np.ndarray:
    """A little-endian bitmap of ceil(n / 8) bytes with clear padding and `count` bits set."""
    nbytes = (n + 7) // 8
    if raw.size != nbytes:
        raise CodecError(f"tensor {name!r}: bitmap has {raw.size} bytes, expected {nbytes}")
    bits = np.unpackbits(raw, bitorder="little")
    if np.any(bits[n:]):
        raise CodecError(f"tensor {name!r}: bitmap padding bits are set")
    idx = np.flatnonzero(bits[:n]).astype(np.int64)
    if idx.size != count:
        raise CodecError(f"tensor {name!r}: bitmap marks {idx.size} coordinates, meta says {count}")
    return idx


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128-encode non-negative integers < 2**35 into a uint8 stream (vectorised)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    nbytes = np.ones(values.size, dtype=np.int64)
    for shift in (7, 14, 21, 28):
        nbytes += values >= (np.uint64(1) << np.uint64(shift))
    starts = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        byte = (values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out


def varint_decode(name: str, raw: np.ndarray) -> np.ndarray:
    """Decode a LEB128 uint8 stream into uint64 values (each at most 5 bytes, < 2**35)."""
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = (raw & 0x80) == 0
    if not ends[-1]:
        raise CodecError(f"tensor {name!r}: truncated varint index stream")
    end_pos = np.flatnonzero(ends)
    starts = np.concatenate(([0], end_pos[:-1] + 1))
    lengths = end_pos - starts + 1
    if lengths.max() > 5:
        raise CodecError(f"tensor {name!r}: varint longer than 5 bytes")
    group = np.repeat(np.arange(starts.size), lengths)
    pos = np.arange(raw.size) - starts[group]
    parts = (raw & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(parts, starts)
