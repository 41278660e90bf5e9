"""model_int8.pt's format: a compressed JSON header and one byte blob, no pickle (loading a file cannot run code).

torch.save's zip container spends ~100-200 bytes per tensor (entry headers, 64-byte alignment,
the pickle), which for the few-thousand-weight models of the demos is as much as the INT8 weights
themselves. Here every tensor is raw bytes in one blob (INT8 weights as their integer
representation with their scales and zero points in the header), so the file is the weights plus a
small index. The state dict it holds is what the quantized module's state_dict() gave, with FX's
packed linear weights already unpacked (fedseek.serving.quantize.portable_state).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

MAGIC = b"FSQ8\x01"
_DTYPES = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


class Int8FileError(ValueError):
    """Not a model_int8.pt written by this version of fedseek (one line)."""


def dumps(state: dict[str, Any]) -> bytes:
    """The state dict as MAGIC + header length + JSON header + blob."""
    blob = bytearray()
    entries = [(key, _encode(value, blob)) for key, value in state.items()]
    header = zlib.compress(json.dumps({"metadata": {k: dict(v) for k, v in (getattr(state, "_metadata", None) or {}).items()},
                                       "entries": entries}, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(blob)


def loads(data: bytes) -> OrderedDict[str, Any]:
    """The state dict back (an OrderedDict with the module versions load_state_dict reads); Int8FileError otherwise."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise Int8FileError("not a fedseek INT8 model file (run fedseek quantize again)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(zlib.decompress(data[start : start + n]))
        blob = memoryview(data)[start + n :]
        out: OrderedDict[str, Any] = OrderedDict((key, _decode(spec, blob)) for key, spec in header["entries"])
    except (ValueError, KeyError, TypeError, IndexError, zlib.error) as exc:
        raise Int8FileError(f"damaged INT8 model file ({type(exc).__name__}: {str(exc)[:120]})") from None
    out._metadata = OrderedDict(header.get("metadata", {}))  # type: ignore[attr-defined]
    return out


def _put(arr: np.ndarray, blob: bytearray) -> dict[str, Any]:
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would make a 0-d scale 1-d)
    spec = {"offset": len(blob), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    blob += arr.tobytes()
    return spec


def _take(spec: dict[str, Any], blob: memoryview) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"], dtype=np.int64))
    end = spec["offset"] + count * dtype.itemsize
    if spec["offset"] < 0 or end > len(blob):
        raise ValueError("an array runs past the end of the file")
    return np.frombuffer(blob[spec["offset"] : end], dtype=dtype).reshape(spec["shape"]).copy()


def _encode(value: Any, blob: bytearray) -> dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor) and value.is_quantized:
        spec: dict[str, Any] = {"kind": "qtensor", "qdtype": str(value.dtype).removeprefix("torch."),
                                "data": _put(value.int_repr().numpy(), blob)}
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            spec.update(scheme="tensor", scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
        else:
            spec.update(scheme="channel", axis=int(value.q_per_channel_axis()),
                        scales=_put(value.q_per_channel_scales().numpy().astype(np.float64), blob),
                        zero_points=_put(value.q_per_channel_zero_points().numpy().astype(np.int64), blob))
        return spec
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "data": _put(value.detach().cpu().numpy(), blob), "parameter": isinstance(value, torch.nn.Parameter)}
    if isinstance(value, tuple):
        return {"kind": "tuple", "items": [_encode(v, blob) for v in value]}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "name": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, bool | int | float | str):
        return {"kind": "value", "value": value}
    raise Int8FileError(f"cannot store a {type(value).__name__} in an INT8 model file")


def _decode(spec: dict[str, Any], blob: memoryview) -> Any:
    import torch

    kind = spec["kind"]
    if kind == "qtensor":
        if spec["qdtype"] not in _DTYPES:
            raise ValueError(f"unknown quantized dtype {spec['qdtype']!r}")
        ints = torch.from_numpy(_take(spec["data"], blob))
        if spec["scheme"] == "tensor":
            return torch._make_per_tensor_quantized_tensor(ints, float(spec["scale"]), int(spec["zero_point"]))
        return torch._make_per_channel_quantized_tensor(ints, torch.from_numpy(_take(spec["scales"], blob)),
                                                        torch.from_numpy(_take(spec["zero_points"], blob)), int(spec["axis"]))
    if kind == "tensor":
        t = torch.from_numpy(_take(spec["data"], blob))
        return torch.nn.Parameter(t, requires_grad=False) if spec.get("parameter") else t
    if kind == "tuple":
        return tuple(_decode(s, blob) for s in spec["items"])
    if kind == "dtype":
        dtype = getattr(torch, str(spec["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {spec['name']!r}")
        return dtype
    if kind == "value":
        return spec["value"]
    raise ValueError(f"unknown entry kind {kind!r}")
