"""The round's wire format between coordinator and sites, on Flower records.

Downlink (coordinator -> site): "global" ArrayRecord (weights, possibly fp16-encoded with
"global-codec" meta), optional "mask" ArrayRecord (1 bit per coordinate) and the "config"
ConfigRecord. Uplink (site -> coordinator): "update" ArrayRecord (the DP model delta encoded
by fedseek.codec), "update-codec" ConfigRecord (codec meta), "metrics" and "site".
Everything a site sends is decoded under validation: a malformed payload is a CodecError.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedseek.codec import CodecSpec, ErrorFeedback, decode, encode
from fedseek.train.sparsity import pack_mask, unpack_mask


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


def pack_update(
    delta: Mapping[str, np.ndarray], spec: CodecSpec, feedback: ErrorFeedback | None, mask: Mapping[str, np.ndarray] | None, nonce: int
) -> tuple[dict[str, Any], int, int]:
    """Site side: encode the DP delta; returns (records, payload bytes, dense fp32 bytes)."""
    enc = encode(delta, spec, feedback if spec.error_feedback else None, mask=mask, nonce=nonce)
    return {"update": to_record(enc.arrays), "update-codec": ConfigRecord(dict(enc.meta))}, enc.nbytes, enc.dense_nbytes


def unpack_update(content: RecordDict, shapes: Mapping[str, tuple[int, ...]], mask: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Coordinator side: decode and validate a site's update delta (raises CodecError / KeyError)."""
    rec = content.array_records["update"]
    meta = dict(content.config_records["update-codec"])
    return decode(from_record(rec), meta, mask=mask, expected_shapes=shapes)
