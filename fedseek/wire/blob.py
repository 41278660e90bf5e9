"""The packed update blob: one uint8 array carrying a site's encoded update and its codec meta.

Layout: b"FSB1" | u32 header length | zlib(JSON {meta, arrays: [[name, dtype, count]]}) | array bytes.
Decoding checks every length and dtype and bounds the header, so bytes from a site either
decode to exactly what was packed or raise CodecError.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseek.wire.codec import CodecError

PACKING = "fedseek-blob-1"
_BLOB_MAGIC = b"FSB1"
_MAX_HEADER = 1 << 20  # decompressed header bytes a site may claim
_BLOB_DTYPES = {"float32", "float16", "int8", "uint8", "uint32"}


def pack_blob(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> np.ndarray:
    """One uint8 array: b"FSB1" | u32 header length | zlib(JSON {meta, arrays: [[name, dtype, count]]}) | array bytes."""
    entries, chunks = [], []
    for name, a in arrays.items():
        arr = np.ascontiguousarray(np.asarray(a).ravel())
        if arr.dtype.name not in _BLOB_DTYPES:
            raise ValueError(f"array {name!r} has dtype {arr.dtype}, not one the wire carries ({', '.join(sorted(_BLOB_DTYPES))})")
        entries.append([name, arr.dtype.name, int(arr.size)])
        chunks.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    header = zlib.compress(json.dumps({"meta": dict(meta), "arrays": entries}, separators=(",", ":")).encode(), 9)
    raw = _BLOB_MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)
    return np.frombuffer(raw, dtype=np.uint8).copy()


def unpack_blob(blob: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of `pack_blob`, for bytes from a site: every length and dtype checked, CodecError otherwise."""
    b = np.asarray(blob)
    if b.dtype != np.uint8 or b.ndim != 1:
        raise CodecError(f"update blob must be 1-D uint8, got {b.dtype} {b.shape}")
    raw = b.tobytes()
    if len(raw) < 8 or raw[:4] != _BLOB_MAGIC:
        raise CodecError("update blob does not start with the fedseek header")
    (hlen,) = struct.unpack("<I", raw[4:8])
    if 8 + hlen > len(raw):
        raise CodecError(f"update blob header claims {hlen} bytes, blob has {len(raw) - 8}")
    try:
        d = zlib.decompressobj()
        text = d.decompress(raw[8 : 8 + hlen], _MAX_HEADER)
        if d.unconsumed_tail:
            raise CodecError(f"update blob header inflates beyond {_MAX_HEADER} bytes")
        head = json.loads(text)
    except (zlib.error, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"update blob header unreadable ({type(exc).__name__})") from None
    if not isinstance(head, dict) or not isinstance(head.get("meta"), dict) or not isinstance(head.get("arrays"), list):
        raise CodecError("update blob header lacks 'meta' / 'arrays'")
    arrays: dict[str, np.ndarray] = {}
    pos = 8 + hlen
    for entry in head["arrays"]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[1] in _BLOB_DTYPES
                and isinstance(entry[2], int) and not isinstance(entry[2], bool) and entry[2] >= 0):
            raise CodecError(f"bad array entry in update blob header: {str(entry)[:80]}")
        name, dt, count = entry
        if name in arrays:
            raise CodecError(f"array {name!r} appears twice in the update blob")
        dtype = np.dtype(dt).newbyteorder("<")
        end = pos + count * dtype.itemsize
        if end > len(raw):
            raise CodecError(f"array {name!r} runs past the end of the update blob")
        arrays[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=pos).astype(np.dtype(dt))
        pos = end
    if pos != len(raw):
        raise CodecError(f"{len(raw) - pos} trailing bytes in the update blob")
    meta = head["meta"]
    for k, v in meta.items():
        if not isinstance(v, (int, float, str)) or isinstance(v, bool):
            raise CodecError(f"meta {k!r} has a value of type {type(v).__name__}")
    return arrays, meta
