"""Coordinator side: decode a site's encoded update under validation.

A trust boundary: every length, dtype, index and meta value is checked; anything inconsistent is a CodecError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedseek.names import CODECS, DENSE_CODECS, INDEX_CODINGS, QUANTIZERS
from fedseek.wire.codec.indices import decode_index
from fedseek.wire.codec.spec import DEFAULT_MAX_ELEMENTS, WIRE_VERSION, CodecError, payload_array
from fedseek.wire.codec.values import dequantize
from fedseek.wire.mask_bits import find_mask, mask_digest

_MAX_NDIM = 32  # a claimed tensor shape has at most this many dimensions


def decode(
    encoded_arrays: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    mask: Mapping[str, np.ndarray] | None = None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, np.ndarray]:
    """Decode to {name: float32 array of the original shape}; raises CodecError on anything inconsistent.

    Pass `expected_shapes` (the global model's {name: shape}) at the coordinator so a site
    cannot claim other tensors or sizes; without it, the total element count is capped by
    `max_elements`. `mask` must be the mask the site encoded with ("sparse_mask" only).
    """
    if not isinstance(meta, Mapping):
        raise CodecError(f"meta must be a mapping, got {type(meta).__name__}")
    if not isinstance(encoded_arrays, Mapping):
        raise CodecError(f"encoded arrays must be a mapping, got {type(encoded_arrays).__name__}")
    kind, vf, coding = _codec_header(meta)
    names = _parse_names(_meta_str(meta, "codec.tensors"))
    if expected_shapes is not None and set(names) != set(expected_shapes):
        missing = sorted(set(expected_shapes) - set(names))
        extra = sorted(set(names) - set(expected_shapes))
        raise CodecError(f"tensor set mismatch: missing {_short(missing)}, unexpected {_short(extra)}")
    if kind == "sparse_mask":
        if mask is None:
            raise CodecError("codec 'sparse_mask' needs the coordinator's mask to decode")
        if _meta_str(meta, "codec.mask_sha256") != mask_digest(mask):
            raise CodecError("mask digest mismatch: the site encoded with a different mask than this one")
    shapes = _shapes(meta, names, expected_shapes, max_elements)
    _check_array_set(encoded_arrays, names, kind, vf)
    out: dict[str, np.ndarray] = {}
    for name in names:
        shape = shapes[name]
        n = math.prod(shape)
        count = _meta_int(meta, f"{name}.count")
        sel = _selection(encoded_arrays, name, kind, coding, mask, shape, count)
        values = dequantize(name, encoded_arrays, vf, count)
        if sel is None:
            out[name] = values.reshape(shape)
        else:
            full = np.zeros(n, dtype=np.float32)
            full[sel] = values
            out[name] = full.reshape(shape)
    return out


def _codec_header(meta: Mapping[str, Any]) -> tuple[str, str, str]:
    """(codec kind, value format, index coding), each checked against the others."""
    kind = _meta_str(meta, "codec")
    if kind not in CODECS:
        raise CodecError(f"unknown codec {kind!r}; allowed: {', '.join(CODECS)}")
    version = _meta_int(meta, "codec.version")
    if version != WIRE_VERSION:
        raise CodecError(f"unsupported codec wire version {version} (this build reads {WIRE_VERSION})")
    vf = _meta_str(meta, "codec.quantize")
    if vf not in QUANTIZERS:
        raise CodecError(f"unknown value format {vf!r}; allowed: {', '.join(QUANTIZERS)}")
    if kind in DENSE_CODECS and vf != kind:
        raise CodecError(f"codec {kind!r} with value format {vf!r} is inconsistent")
    coding = _meta_str(meta, "codec.index")
    if kind == "topk" and coding not in INDEX_CODINGS:
        raise CodecError(f"unknown index coding {coding!r}; allowed: {', '.join(INDEX_CODINGS)}")
    if kind != "topk" and coding != "none":
        raise CodecError(f"codec {kind!r} carries no indices but meta says index coding {coding!r}")
    return kind, vf, coding


def _shapes(
    meta: Mapping[str, Any], names: list[str], expected: Mapping[str, tuple[int, ...]] | None, max_elements: int
) -> dict[str, tuple[int, ...]]:
    """Every tensor's claimed shape, checked against the expected shapes or the element cap."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name in names:
        shape = _parse_shape(name, _meta_str(meta, f"{name}.shape"))
        if expected is not None and tuple(int(d) for d in expected[name]) != shape:
            raise CodecError(f"tensor {name!r}: shape {shape} differs from the expected {tuple(expected[name])}")
        shapes[name] = shape
        total += math.prod(shape)
        if expected is None and total > max_elements:
            raise CodecError(f"update claims more than max_elements={max_elements} elements")
        _meta_str(meta, f"{name}.dtype")
    return shapes


def _check_array_set(encoded_arrays: Mapping[str, Any], names: list[str], kind: str, vf: str) -> None:
    """The payload holds exactly the arrays the meta implies: values, int8 scales, top-k indices."""
    expected_keys: set[str] = set()
    for name in names:
        expected_keys.add(f"{name}.val")
        if vf == "int8":
            expected_keys.add(f"{name}.scale")
        if kind == "topk":
            expected_keys.add(f"{name}.idx")
    got = set(encoded_arrays)
    if got != expected_keys:
        missing, unexpected = _short(sorted(expected_keys - got)), _short(sorted(map(str, got - expected_keys)))
        raise CodecError(f"array set mismatch: missing {missing}, unexpected {unexpected}")


def _selection(
    encoded_arrays: Mapping[str, Any], name: str, kind: str, coding: str, mask: Mapping[str, np.ndarray] | None,
    shape: tuple[int, ...], count: int,
) -> np.ndarray | None:
    """Flat indices the values go to (None: all of them, in order), checked against the claimed count."""
    n = math.prod(shape)
    if kind in DENSE_CODECS:
        if count != n:
            raise CodecError(f"tensor {name!r}: dense codec must send {n} values, meta says {count}")
        return None
    if kind == "sparse_mask":
        assert mask is not None
        m = find_mask(mask, name)
        if m is None:
            if count != n:
                raise CodecError(f"tensor {name!r} is unmasked: must send {n} values, meta says {count}")
            return None
        m = np.asarray(m)
        if m.dtype != np.bool_ or tuple(m.shape) != shape:
            raise CodecError(f"tensor {name!r}: mask shape {tuple(m.shape)} does not match {shape}")
        sel = np.flatnonzero(m.ravel())
        if count != sel.size:
            raise CodecError(f"tensor {name!r}: mask has {sel.size} active coordinates, meta says {count}")
        return sel
    if not 0 <= count <= n:
        raise CodecError(f"tensor {name!r}: top-k count {count} outside [0, {n}]")
    raw = payload_array(encoded_arrays, f"{name}.idx", np.dtype(np.uint32 if coding == "uint32" else np.uint8))
    return decode_index(name, raw, n, count, coding)


def _short(items: list[str], limit: int = 5) -> str:
    """Render a list for a one-line error message, truncated."""
    if not items:
        return "[]"
    shown = ", ".join(repr(s) for s in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def _meta_str(meta: Mapping[str, Any], key: str) -> str:
    """A required string meta value."""
    if key not in meta:
        raise CodecError(f"meta lacks {key!r}")
    v = meta[key]
    if not isinstance(v, str):
        raise CodecError(f"meta {key!r} must be a string, got {type(v).__name__}")
    return v


def _meta_int(meta: Mapping[str, Any], key: str) -> int:
    """A required integer meta value (bools rejected)."""
    if key not in meta:
        raise CodecError(f"meta lacks {key!r}")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise CodecError(f"meta {key!r} must be an int, got {type(v).__name__}")
    return int(v)


def _parse_names(raw: str) -> list[str]:
    """Parse ``codec.tensors``: a JSON list of unique non-empty strings."""
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"meta 'codec.tensors' is not valid JSON: {exc}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise CodecError("meta 'codec.tensors' must be a JSON list of non-empty strings")
    if len(set(names)) != len(names):
        raise CodecError("meta 'codec.tensors' lists a tensor twice")
    return names


def _parse_shape(name: str, raw: str) -> tuple[int, ...]:
    """Parse ``<t>.shape``: a JSON list of non-negative ints."""
    try:
        shape = json.loads(raw)
    except (ValueError, RecursionError):
        raise CodecError(f"tensor {name!r}: shape {raw[:40]!r} is not valid JSON") from None
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
    ):
        raise CodecError(f"tensor {name!r}: shape must be a list of at most {_MAX_NDIM} non-negative ints")
    return tuple(shape)
