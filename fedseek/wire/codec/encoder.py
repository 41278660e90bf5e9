"""Site side: encode a (DP) update delta with the round's codec (top-k, quantization, sparse masks)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseek.wire.codec.decoder import decode
from fedseek.wire.codec.feedback import ErrorFeedback
from fedseek.wire.codec.spec import _FP16_MAX, WIRE_VERSION, CodecSpec, EncodedUpdate, _find, mask_digest


def encode(
    update: Mapping[str, Any],
    spec: CodecSpec,
    state: ErrorFeedback | None = None,
    *,
    mask: Mapping[str, np.ndarray] | None = None,
    nonce: int = 0,
) -> EncodedUpdate:
    """Encode a DP update {name: array} per `spec`; with error feedback, `state` is read and updated.

    `mask` (bool arrays by tensor name, `_module.` prefixes tolerated) is required by
    "sparse_mask"; tensors absent from it are sent dense. Coordinates outside the mask are
    dropped for good (their residual is zeroed), not delayed. `nonce` (e.g. the round number)
    is mixed into `spec.seed` so each round draws fresh rounding noise. When
    `spec.error_feedback` is False, `state` is left untouched.
    """
    _check_args(spec, state, mask, nonce)
    flat, shapes, dtypes = _flatten(update)
    u = state.add_to(flat) if spec.error_feedback and state is not None else flat
    u = {k: v.ravel() for k, v in u.items()}
    rng = np.random.default_rng([spec.seed, nonce]) if spec.seed is not None else np.random.default_rng()
    masks_flat = _flat_masks(u, mask, shapes) if spec.kind == "sparse_mask" else {}
    selected = _select(u, spec, masks_flat)
    arrays: dict[str, np.ndarray] = {}
    meta = _header(spec, u, mask)
    for name, vec in u.items():
        idx = selected[name]
        values = vec if idx is None else vec[idx]
        arrays.update(_quantize(name, values, spec.value_format, rng))
        if spec.kind == "topk":
            assert idx is not None
            arrays[f"{name}.idx"] = _encode_index(idx, vec.size, spec.index_coding)
        meta[f"{name}.shape"] = json.dumps(list(shapes[name]))
        meta[f"{name}.dtype"] = dtypes[name]
        meta[f"{name}.count"] = int(values.size)
    enc = EncodedUpdate(arrays=arrays, meta=meta, dense_nbytes=int(sum(4 * v.size for v in u.values())))
    if spec.error_feedback and state is not None:
        decoded = decode(arrays, meta, mask=mask, expected_shapes=shapes)
        for name, vec in u.items():
            resid = vec - decoded[name].ravel()
            m = masks_flat.get(name)
            if m is not None:
                resid[~m] = 0.0  # pruned coordinates are dropped by design, not delayed
            state.set_residual(name, resid.reshape(shapes[name]))
    return enc


def _check_args(spec: CodecSpec, state: ErrorFeedback | None, mask: Mapping[str, np.ndarray] | None, nonce: int) -> None:
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    if spec.error_feedback and state is None:
        raise ValueError("spec.error_feedback is True but no ErrorFeedback state was given")
    if isinstance(nonce, bool) or not isinstance(nonce, int) or nonce < 0:
        raise ValueError(f"nonce must be a non-negative int, got {nonce!r}")
    if spec.kind == "sparse_mask" and mask is None:
        raise ValueError("codec 'sparse_mask' needs the mask (encode(..., mask=...))")


def _flatten(update: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]], dict[str, str]]:
    """float32 copies of every tensor with their shapes and original dtypes; ValueError for anything unencodable."""
    flat: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, x in update.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        arr = _as_numpy(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"tensor {name!r} has non-numeric dtype {arr.dtype}")
        shapes[name] = tuple(int(d) for d in arr.shape)
        dtypes[name] = str(arr.dtype)
        a32 = arr.astype(np.float32)
        if not np.all(np.isfinite(a32)):
            raise ValueError(f"tensor {name!r} has non-finite values (or overflows float32); refusing to encode")
        if a32.size >= 1 << 32:
            raise ValueError(f"tensor {name!r} has {a32.size} elements; the wire format indexes with uint32")
        flat[name] = a32
    return flat, shapes, dtypes


def _flat_masks(
    u: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray] | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray | None]:
    """Each tensor's mask, flattened (None: the tensor is sent dense)."""
    assert mask is not None
    out: dict[str, np.ndarray | None] = {}
    for name in u:
        m = _find(mask, name)
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


def _header(spec: CodecSpec, u: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray] | None) -> dict[str, int | float | str]:
    """The codec-wide meta keys (per-tensor keys are added by the caller)."""
    meta: dict[str, int | float | str] = {
        "codec": spec.kind,
        "codec.version": WIRE_VERSION,
        "codec.quantize": spec.value_format,
        "codec.index": spec.index_coding if spec.kind == "topk" else "none",
        "codec.tensors": json.dumps(list(u)),
    }
    if spec.kind == "sparse_mask":
        assert mask is not None
        meta["codec.mask_sha256"] = mask_digest(mask)
    if spec.kind == "topk":
        meta["codec.topk_scope"] = spec.topk_scope
        meta["codec.topk_fraction"] = float(spec.topk_fraction)
    return meta


def _as_numpy(x: Any) -> np.ndarray:
    """Convert an array-like (numpy, torch CPU tensor, list) to numpy without keeping autograd."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _select(u: Mapping[str, np.ndarray], spec: CodecSpec, masks_flat: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """Which flat indices each tensor sends (sorted int64), or None for all of them."""
    if spec.kind in ("none", "fp16", "int8"):
        return dict.fromkeys(u)
    if spec.kind == "sparse_mask":
        return {k: (None if (m := masks_flat.get(k)) is None else np.flatnonzero(m)) for k in u}
    out: dict[str, np.ndarray | None] = {}
    if spec.topk_scope == "layer":
        for name, vec in u.items():
            k = min(vec.size, math.ceil(spec.topk_fraction * vec.size))
            out[name] = _topk_indices(np.abs(vec), k)
        return out
    names = list(u)
    sizes = [u[n].size for n in names]
    total = int(sum(sizes))
    k = min(total, math.ceil(spec.topk_fraction * total))
    allabs = np.concatenate([np.abs(u[n]) for n in names]) if names else np.zeros(0, np.float32)
    chosen = _topk_indices(allabs, k)
    bounds = np.cumsum([0] + sizes)
    for i, name in enumerate(names):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        a, b = np.searchsorted(chosen, [lo, hi])
        out[name] = chosen[a:b] - lo
    return out


def _topk_indices(absval: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of exactly k largest entries of `absval` (ties broken deterministically)."""
    n = absval.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(-absval, k - 1)[:k]
    return np.sort(part).astype(np.int64)


def _quantize(name: str, values: np.ndarray, fmt: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encode a float32 value vector as fp32 / fp16 / int8 (+ scale, unbiased stochastic rounding)."""
    if fmt == "none":
        return {f"{name}.val": np.ascontiguousarray(values, dtype=np.float32)}
    if fmt == "fp16":
        if values.size and float(np.max(np.abs(values))) > _FP16_MAX:
            raise ValueError(f"tensor {name!r} has values beyond the fp16 range ({_FP16_MAX}); use int8 or fp32")
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


def _encode_index(idx: np.ndarray, n: int, coding: str) -> np.ndarray:
    """Encode sorted unique flat indices of a tensor of n elements."""
    if coding == "uint32":
        return idx.astype(np.uint32)
    if coding == "bitmap":
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        return np.packbits(bits, bitorder="little")
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0 since strictly increasing
    return _varint_encode(gaps.astype(np.uint64))


def _varint_encode(values: np.ndarray) -> np.ndarray:
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
