"""Site side: encode a (DP) update delta with the round's codec (top-k, quantization, sparse masks)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseek.wire.codec.decoder import decode
from fedseek.wire.codec.feedback import ErrorFeedback
from fedseek.wire.codec.indices import encode_index
from fedseek.wire.codec.sparse import flat_masks, select
from fedseek.wire.codec.spec import WIRE_VERSION, CodecSpec, EncodedUpdate
from fedseek.wire.codec.values import quantize
from fedseek.wire.mask_bits import mask_digest


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
    masks_flat = flat_masks(u, mask, shapes) if spec.kind == "sparse_mask" else {}
    selected = select(u, spec, masks_flat)
    arrays: dict[str, np.ndarray] = {}
    meta = _header(spec, u, mask)
    for name, vec in u.items():
        idx = selected[name]
        values = vec if idx is None else vec[idx]
        arrays.update(quantize(name, values, spec.value_format, rng))
        if spec.kind == "topk":
            assert idx is not None
            arrays[f"{name}.idx"] = encode_index(idx, vec.size, spec.index_coding)
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
    """Refuse arguments that cannot encode: a non-CodecSpec, missing feedback state or mask, a bad nonce."""
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
