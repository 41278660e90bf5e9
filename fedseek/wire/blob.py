"""The packed update blob: one uint8 array carrying a site's encoded update and its codec meta.

Layout: b"FSB1" | u32 header length | zlib(JSON {meta, arrays: [[name, dtype, count]]}) | array bytes.
Decoding checks every length and dtype and bounds the header, so bytes from a site either
decode to exactly what was packed or raise CodecError. The header is read by pydantic-core's
JSON parser (nesting depth capped by its recursion limit, NaN/Infinity refused) into a strict
schema of depth 3, after inflating at most `_MAX_HEADER` bytes: a nested, huge or oddly typed
header is a CodecError, never a RecursionError or MemoryError in the coordinator.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseek.wire.codec import CodecError

PACKING = "fedseek-blob-1"
_BLOB_MAGIC = b"FSB1"
_MAX_HEADER = 1 << 20  # decompressed header bytes a site may claim
_MAX_ENTRIES = 4096  # arrays in one blob, meta keys in its header
_MAX_COUNT = 1 << 40  # elements one array may claim (the blob's own length bounds it further)
_BLOB_DTYPES = {"float32", "float16", "int8", "uint8", "uint32"}

_Name = Annotated[str, Field(max_length=512)]
_MetaValue = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)] | float | Annotated[str, Field(max_length=_MAX_HEADER)]
_Entry = tuple[_Name, Literal["float32", "float16", "int8", "uint8", "uint32"], Annotated[int, Field(ge=0, le=_MAX_COUNT)]]


class _Header(BaseModel):
    """The blob header as a site must send it: flat meta of finite scalars, one [name, dtype, count] per array."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    meta: dict[_Name, _MetaValue] = Field(max_length=_MAX_ENTRIES)
    arrays: list[_Entry] = Field(max_length=_MAX_ENTRIES)


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
    head = _read_header(raw[8 : 8 + hlen])
    arrays: dict[str, np.ndarray] = {}
    pos = 8 + hlen
    for name, dt, count in head.arrays:
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
    return arrays, dict(head.meta)


def _read_header(compressed: bytes) -> _Header:
    """Inflate (at most `_MAX_HEADER` bytes) and validate the header; CodecError naming the first problem otherwise."""
    try:
        d = zlib.decompressobj()
        text = d.decompress(compressed, _MAX_HEADER)
    except zlib.error:
        raise CodecError("update blob header unreadable (zlib error)") from None
    if d.unconsumed_tail:
        raise CodecError(f"update blob header inflates beyond {_MAX_HEADER} bytes")
    try:
        return _Header.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])[:120] or "(header)"
        raise CodecError(f"update blob header invalid at {where}: {str(err['msg'])[:160]}") from None
