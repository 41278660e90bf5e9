"""The round's wire format between coordinator and sites, on Flower records.

Downlink (coordinator -> site): "global" ArrayRecord (weights, possibly fp16-encoded with
"global-codec" meta), optional "mask" ArrayRecord (1 bit per coordinate) and the "config"
ConfigRecord. Uplink (site -> coordinator): "update" ArrayRecord holding ONE uint8 array "blob" (the DP
model delta encoded by fedseek.wire.codec, packed with its meta, see `pack_blob`), "update-codec"
ConfigRecord naming the packing, "metrics" and "site". Why one blob: Flower frames every
Array (~130 B of .npy header plus its key) and a ConfigRecord carries JSON text, so a
10-tensor top-k update sent as 30 arrays + meta cost ~5.7 KB of framing around ~2 KB of
payload; packed, the wire size is the payload plus one header (measured in tests).
Everything a site sends is decoded under validation: a malformed payload is a CodecError.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

from fedseek.wire.blob import PACKING, pack_blob, unpack_blob
from fedseek.wire.codec import CodecError, CodecSpec, EncodedUpdate, ErrorFeedback, decode, encode, payload_bytes
from fedseek.wire.mask_bits import pack_mask, unpack_mask


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord (contiguous copies)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> numpy arrays."""
    return {k: v.numpy() for k, v in rec.items()}


def pack_global(arrays: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray] | None, downlink: str) -> tuple[dict[str, Any], int]:
    """Records carrying the global model (and mask) to sites; returns (records, payload bytes)."""
    records: dict[str, Any] = {}
    if downlink == "fp16":
        enc = encode(arrays, CodecSpec(kind="fp16"))
        records["global"] = to_record(enc.arrays)
        records["global-codec"] = ConfigRecord(dict(enc.meta))
        nbytes = enc.nbytes
    else:
        records["global"] = to_record(arrays)
        nbytes = int(sum(np.asarray(a).nbytes for a in arrays.values()))
    if mask:
        packed = pack_mask(mask)
        records["mask"] = to_record(packed)
        nbytes += int(sum(p.nbytes for p in packed.values()))
    return records, nbytes


def unpack_global(content: RecordDict, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Site side: global weights (float32) and the mask, if any."""
    rec = content.array_records["global"]
    if "global-codec" in content.config_records:
        arrays = decode(from_record(rec), dict(content.config_records["global-codec"]), expected_shapes=shapes)
    else:
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in from_record(rec).items()}
    mask = None
    if "mask" in content.array_records:
        packed = from_record(content.array_records["mask"])
        mask = unpack_mask(packed, {k: shapes[k] for k in packed})
    return arrays, mask


def update_records(enc: EncodedUpdate) -> dict[str, Any]:
    """The records carrying an encoded update: one packed blob + the packing's name."""
    return {"update": ArrayRecord({"blob": Array(pack_blob(enc.arrays, enc.meta))}), "update-codec": ConfigRecord({"packing": PACKING})}


def pack_update(
    delta: Mapping[str, np.ndarray], spec: CodecSpec, feedback: ErrorFeedback | None, mask: Mapping[str, np.ndarray] | None, nonce: int
) -> tuple[dict[str, Any], int, int]:
    """Site side: encode the DP delta; returns (records, payload bytes, dense fp32 bytes)."""
    enc = encode(delta, spec, feedback if spec.error_feedback else None, mask=mask, nonce=nonce)
    return update_records(enc), enc.nbytes, enc.dense_nbytes


def update_wire_bytes(content: RecordDict) -> int:
    """Bytes the update occupies in Flower's records (array data with .npy headers and keys, codec record)."""
    n = int(content.array_records["update"].count_bytes())
    if "update-codec" in content.config_records:
        n += int(content.config_records["update-codec"].count_bytes())
    return n


def unpack_update(
    content: RecordDict, shapes: Mapping[str, tuple[int, ...]], mask: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], int]:
    """Coordinator side: decode and validate a site's update delta; returns (delta, codec payload bytes).

    Raises CodecError / KeyError on anything malformed.
    """
    rec = content.array_records["update"]
    cfg = dict(content.config_records["update-codec"])
    if cfg.get("packing") != PACKING:
        raise CodecError(f"unknown update packing {str(cfg.get('packing', ''))[:40]!r}; this coordinator reads {PACKING!r}")
    if set(rec.keys()) != {"blob"}:
        raise CodecError(f"packed update must hold exactly one array 'blob', got {sorted(rec.keys())[:5]}")
    arrays, meta = unpack_blob(blob_bytes(rec["blob"]))
    return decode(arrays, meta, mask=mask, expected_shapes=shapes), payload_bytes(arrays)


def blob_bytes(arr: Array) -> np.ndarray:
    """The packed blob's bytes from a site's Array, reading its .npy header first: nothing is allocated beyond what was sent.

    (np.load allocates the array a header claims before reading it; a site's header may claim terabytes.)
    """
    if arr.stype != SType.NUMPY:
        raise CodecError(f"update blob has serialization type {str(arr.stype)[:40]!r}, not numpy.ndarray")
    data = bytes(arr.data)
    fp = BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
    except Exception as exc:  # ValueError, or SyntaxError from a garbled header dict
        raise CodecError(f"update blob is not a .npy array ({type(exc).__name__}: {str(exc)[:80]})") from None
    if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(data) - fp.tell():
        raise CodecError(f"update blob must be 1-D uint8 of the bytes sent, header claims {dtype} {tuple(shape)[:4]}")
    return np.frombuffer(data, dtype=np.uint8, offset=fp.tell())
