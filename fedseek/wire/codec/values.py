"""Value formats on the wire: fp32, fp16, or int8 with a per-tensor scale and unbiased stochastic rounding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseek.wire.codec.spec import CodecError, payload_array

FP16_MAX = float(np.finfo(np.float16).max)


VALUE_DTYPES: dict[str, np.dtype] = {"none": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def quantize(name: str, values: np.ndarray, fmt: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encode a float32 value vector as fp32 / fp16 / int8 (+ scale, unbiased stochastic rounding)."""
    if fmt == "none":
        return {f"{name}.val": np.ascontiguousarray(values, dtype=np.float32)}
    if fmt == "fp16":
        if values.size and float(np.max(np.abs(values))) > FP16_MAX:
            raise ValueError(f"tensor {name!r} has values beyond the fp16 range ({FP16_MAX}); use int8 or fp32")
        return {f"{name}.val": values.astype(np.float16)}
    maxabs = float(np.max(np.abs(values))) if values.size else 0.0
    scale = np.float32(maxabs / 127.0)
    if scale > 0 and maxabs / float(scale) > 127.0:
        scale = np.nextafter(scale, np.float32(np.inf))  # float32 rounding must not push |v|/scale past 127
    if scale > 0:
        y = values.astype(np.float64) / float(scale)
        q = np.floor(y + rng.random(values.size))  # E[q] = y: unbiased
        q = np.clip(q, -127, 127)  # no-op by construction; guards the int8 cast
    else:
        q = np.zeros(values.size)
    return {f"{name}.val": q.astype(np.int8), f"{name}.scale": np.array([scale], dtype=np.float32)}


def dequantize(name: str, arrays: Mapping[str, Any], fmt: str, count: int) -> np.ndarray:
    """Check and decode `count` values of tensor `name` to float32."""
    val = payload_array(arrays, f"{name}.val", VALUE_DTYPES[fmt])
    if val.size != count:
        raise CodecError(f"tensor {name!r}: {val.size} values sent, meta says {count}")
    if fmt == "int8":
        scale = payload_array(arrays, f"{name}.scale", np.dtype(np.float32))
        if scale.size != 1:
            raise CodecError(f"tensor {name!r}: scale must hold exactly one value, got {scale.size}")
        s = scale[0]
        if not np.isfinite(s) or s < 0:
            raise CodecError(f"tensor {name!r}: scale {float(s)!r} is not a finite non-negative number")
        if val.size and int(val.min()) < -127:
            raise CodecError(f"tensor {name!r}: int8 value -128 is outside the codec's range [-127, 127]")
        out = val.astype(np.float32) * s
    else:
        out = val.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise CodecError(f"tensor {name!r}: non-finite values")
    return out
