"""Update codecs applied AFTER DP-SGD (post-processing): fp16, int8, top-k + error feedback, sparse masks.

Everything here acts on the released, already-noised update Δ_t (anchors C.2 rule 1), so it
costs no privacy; the stochastic-rounding randomness need not be secret. Pure numpy, so the
coordinator and the sites share one implementation; Flower glue lives in the callers.

Wire format (version 1). An `EncodedUpdate` is a flat dict of 1-D numpy arrays, named
``"<tensor>.<field>"`` (fits an `ArrayRecord`), plus a flat `meta` dict of int/float/str
(fits a `ConfigRecord`; extra keys from the caller are ignored at decode).

Arrays per tensor of n elements, sending `c` values (``"<tensor>.count"`` in meta):
    ``<t>.val``   c values: float32 ("none"), float16 ("fp16") or int8 in [-127, 127] ("int8")
    ``<t>.scale`` float32, shape (1,), only for int8 values: value = q * scale
    ``<t>.idx``   only for "topk": "uint32" -> c sorted uint32 flat indices;
                  "delta" -> LEB128 varints (uint8) of idx[0] then idx[i] - idx[i-1] - 1;
                  "bitmap" -> ceil(n / 8) uint8, np.packbits(..., bitorder="little")
Codecs: "none" / "fp16" / "int8" send all n values (c = n); "topk" sends c = k values plus
indices; "sparse_mask" sends only the c = mask.sum() masked-in values in row-major order (no
indices: both sides hold the mask; ``codec.mask_sha256`` checks they hold the same one).

Meta keys: ``codec`` (kind), ``codec.version`` (1), ``codec.quantize`` (value format),
``codec.index`` (index coding or "none"), ``codec.tensors`` (JSON list of names, in order),
``codec.mask_sha256`` (sparse_mask only), and per tensor ``<t>.shape`` (JSON list of ints),
``<t>.dtype`` (original dtype, informational) and ``<t>.count`` (values sent).

Decoding is a trust boundary (data from a site): every length, dtype, index range and meta
value is checked and any inconsistency raises `CodecError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CODECS",
    "QUANTIZERS",
    "INDEX_CODINGS",
    "TOPK_SCOPES",
    "WIRE_VERSION",
    "DEFAULT_MAX_ELEMENTS",
    "CodecError",
    "CodecSpec",
    "EncodedUpdate",
    "ErrorFeedback",
    "encode",
    "decode",
    "payload_bytes",
    "mask_digest",
]

CODECS = ("none", "fp16", "int8", "topk", "sparse_mask")
QUANTIZERS = ("none", "fp16", "int8")
INDEX_CODINGS = ("uint32", "delta", "bitmap")
TOPK_SCOPES = ("layer", "global")
WIRE_VERSION = 1
DEFAULT_MAX_ELEMENTS = 1 << 27  # decode refuses claims above this unless told the shapes
_FP16_MAX = float(np.finfo(np.float16).max)
_VALUE_DTYPES = {"none": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}
_MAX_NDIM = 32
_WRAP_PREFIX = "_module."


class CodecError(ValueError):
    """A received encoded update is malformed or inconsistent with its meta (trust boundary)."""


def _canonical(name: str) -> str:
    """Strip Opacus' ``_module.`` wrapper prefixes so wrapped and plain names match."""
    while name.startswith(_WRAP_PREFIX):
        name = name[len(_WRAP_PREFIX) :]
    return name


@dataclass(frozen=True)
class CodecSpec:
    """Which codec to apply; validated on construction so bad configs fail before training.

    kind: "none" (fp32 dense) | "fp16" | "int8" (per-tensor scale, stochastic rounding) |
          "topk" | "sparse_mask".
    topk_fraction: fraction of coordinates kept by "topk", in (0, 1]; k = ceil(fraction * n).
    quantize: value format for "topk" / "sparse_mask" values ("none" = fp32); for the dense
          kinds it must be "none" or equal to the kind.
    error_feedback: carry what the codec dropped (or rounded) into the next round's update.
    seed: seeds stochastic rounding (mixed with `encode(nonce=...)`); None = fresh entropy.
    topk_scope: "layer" keeps ceil(fraction * n_t) per tensor (every tensor, biases included,
          gets a share; payload size is data-independent); "global" keeps ceil(fraction * N)
          over all tensors by |value| (a tensor may get zero).
    index_coding: (topk only) "uint32" (4 B/index), "delta" (LEB128 varint gaps, ~1-2 B/index at 1-10%),
          "bitmap" (n/8 B per tensor; smallest above ~3-25% density).
    """

    kind: str = "none"
    topk_fraction: float = 0.1
    quantize: str = "none"
    error_feedback: bool = False
    seed: int | None = None
    topk_scope: str = "layer"
    index_coding: str = "uint32"

    def __post_init__(self) -> None:
        """Reject unknown names and out-of-range numbers with the allowed values listed."""
        if self.kind not in CODECS:
            raise ValueError(f"unknown codec {self.kind!r}; allowed: {', '.join(CODECS)}")
        if self.quantize not in QUANTIZERS:
            raise ValueError(f"unknown quantize {self.quantize!r}; allowed: {', '.join(QUANTIZERS)}")
        if self.kind in ("fp16", "int8") and self.quantize not in ("none", self.kind):
            raise ValueError(f"codec {self.kind!r} already fixes the value format; quantize must be 'none' or {self.kind!r}")
        if self.kind == "none" and self.quantize != "none":
            raise ValueError("codec 'none' sends fp32; use kind 'fp16' or 'int8' to quantize dense updates")
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"unknown topk_scope {self.topk_scope!r}; allowed: {', '.join(TOPK_SCOPES)}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"unknown index_coding {self.index_coding!r}; allowed: {', '.join(INDEX_CODINGS)}")
        frac = self.topk_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 < float(frac) <= 1.0):
            raise ValueError(f"topk_fraction must be in (0, 1], got {frac!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be a bool, got {self.error_feedback!r}")

    @property
    def value_format(self) -> str:
        """The format of the values on the wire: 'none' (fp32) | 'fp16' | 'int8'."""
        return self.kind if self.kind in ("fp16", "int8") else self.quantize


@dataclass
class EncodedUpdate:
    """One encoded update: payload arrays (ArrayRecord), meta (ConfigRecord) and exact byte counts."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, int | float | str]
    nbytes: int = field(init=False)
    dense_nbytes: int = 0  # what the same tensors cost as fp32: the compression baseline

    def __post_init__(self) -> None:
        """Compute the exact payload size from the arrays (meta not counted)."""
        self.nbytes = payload_bytes(self.arrays)

    @property
    def ratio(self) -> float:
        """Compression ratio versus dense fp32 (inf for an empty payload of a non-empty update)."""
        if self.nbytes == 0:
            return math.inf if self.dense_nbytes else 1.0
        return self.dense_nbytes / self.nbytes


def payload_bytes(arrays: Mapping[str, Any]) -> int:
    """Exact payload bytes: the sum of the arrays' nbytes (Flower adds ~128 B of .npy header per array)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def mask_digest(mask: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a mask (canonical names, shapes, bits) so both sides can prove they hold the same one."""
    h = hashlib.sha256(b"fedseek-mask-v1")
    for name in sorted(_canonical(k) for k in mask):
        m = _find(mask, name)
        arr = np.asarray(m)
        h.update(name.encode() + b"\0" + json.dumps(list(arr.shape)).encode() + b"\0")
        h.update(np.packbits(arr.astype(bool).ravel(), bitorder="little").tobytes())
    return h.hexdigest()


def _find(mask: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """Look up a mask entry by canonical name, tolerating ``_module.`` prefixes on either side."""
    if name in mask:
        return mask[name]
    canon = _canonical(name)
    for k, v in mask.items():
        if _canonical(k) == canon:
            return v
    return None


class ErrorFeedback:
    """Per-site error-feedback memory e_t = u - decode(encode(u)), u = Δ_t + e_{t-1} (post-processing).

    Keep one per site for the whole run and persist it with `state_dict()` (numpy arrays only,
    safe to save with np.savez; never unpickle state received from elsewhere).
    """

    def __init__(self) -> None:
        """Start with an empty (all-zero) memory."""
        self.residual: dict[str, np.ndarray] = {}

    def add_to(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return u = update + residual (float32, new arrays); residual shapes must match."""
        out: dict[str, np.ndarray] = {}
        for name, x in update.items():
            r = self.residual.get(name)
            if r is None:
                out[name] = np.array(x, dtype=np.float32, copy=True)
            else:
                if r.shape != x.shape:
                    raise ValueError(f"error-feedback residual for {name!r} has shape {r.shape}, update has {x.shape}")
                out[name] = (x.astype(np.float32, copy=False) + r).astype(np.float32, copy=False)
        return out

    def set_residual(self, name: str, value: np.ndarray) -> None:
        """Store the new residual for one tensor (float32 copy)."""
        self.residual[name] = np.array(value, dtype=np.float32, copy=True)

    def reset(self) -> None:
        """Forget all residuals (e.g. when the model architecture changes)."""
        self.residual.clear()

    def norm(self) -> float:
        """L2 norm of the whole memory: telemetry for how much update is still pending."""
        return float(math.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in self.residual.values())))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The memory as {tensor name: float32 array} copies, for checkpoints."""
        return {k: v.copy() for k, v in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from `state_dict()` output; rejects non-numeric or non-finite arrays."""
        new: dict[str, np.ndarray] = {}
        for k, v in state.items():
            arr = np.asarray(v)
            if not isinstance(k, str) or arr.dtype.kind not in "fiu":
                raise ValueError(f"error-feedback state entry {k!r} is not a numeric array (dtype {arr.dtype})")
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"error-feedback state entry {k!r} has non-finite values")
            new[k] = arr
        self.residual = new


# ----------------------------------------------------------------------------- encode


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
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    if spec.error_feedback and state is None:
        raise ValueError("spec.error_feedback is True but no ErrorFeedback state was given")
    if isinstance(nonce, bool) or not isinstance(nonce, int) or nonce < 0:
        raise ValueError(f"nonce must be a non-negative int, got {nonce!r}")
    if spec.kind == "sparse_mask" and mask is None:
        raise ValueError("codec 'sparse_mask' needs the mask (encode(..., mask=...))")

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

    u = state.add_to(flat) if spec.error_feedback and state is not None else flat
    u = {k: v.ravel() for k, v in u.items()}
    rng = np.random.default_rng([spec.seed, nonce]) if spec.seed is not None else np.random.default_rng()

    masks_flat: dict[str, np.ndarray | None] = {}
    if spec.kind == "sparse_mask":
        assert mask is not None
        for name in u:
            m = _find(mask, name)
            if m is None:
                masks_flat[name] = None
                continue
            m = np.asarray(m)
            if m.dtype != np.bool_:
                raise ValueError(f"mask for {name!r} must be a bool array, got dtype {m.dtype}")
            if tuple(m.shape) != shapes[name]:
                raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, update has {shapes[name]}")
            masks_flat[name] = m.ravel()

    selected = _select(u, spec, masks_flat)
    vf = spec.value_format
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, int | float | str] = {
        "codec": spec.kind,
        "codec.version": WIRE_VERSION,
        "codec.quantize": vf,
        "codec.index": spec.index_coding if spec.kind == "topk" else "none",
        "codec.tensors": json.dumps(list(u)),
    }
    if spec.kind == "sparse_mask":
        assert mask is not None
        meta["codec.mask_sha256"] = mask_digest(mask)
    if spec.kind == "topk":
        meta["codec.topk_scope"] = spec.topk_scope
        meta["codec.topk_fraction"] = float(spec.topk_fraction)

    for name, vec in u.items():
        idx = selected[name]
        values = vec if idx is None else vec[idx]
        arrays.update(_quantize(name, values, vf, rng))
        if spec.kind == "topk":
            assert idx is not None
            arrays[f"{name}.idx"] = _encode_index(idx, vec.size, spec.index_coding)
        meta[f"{name}.shape"] = json.dumps(list(shapes[name]))
        meta[f"{name}.dtype"] = dtypes[name]
        meta[f"{name}.count"] = int(values.size)

    dense = int(sum(4 * v.size for v in u.values()))
    enc = EncodedUpdate(arrays=arrays, meta=meta, dense_nbytes=dense)

    if spec.error_feedback and state is not None:
        decoded = decode(arrays, meta, mask=mask, expected_shapes=shapes)
        for name, vec in u.items():
            resid = vec - decoded[name].ravel()
            m = masks_flat.get(name)
            if m is not None:
                resid[~m] = 0.0  # pruned coordinates are dropped by design, not delayed
            state.set_residual(name, resid.reshape(shapes[name]))
    return enc


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
        return {k: (None if masks_flat.get(k) is None else np.flatnonzero(masks_flat[k])) for k in u}
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


# ----------------------------------------------------------------------------- decode


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
    kind = _meta_str(meta, "codec")
    if kind not in CODECS:
        raise CodecError(f"unknown codec {kind!r}; allowed: {', '.join(CODECS)}")
    version = _meta_int(meta, "codec.version")
    if version != WIRE_VERSION:
        raise CodecError(f"unsupported codec wire version {version} (this build reads {WIRE_VERSION})")
    vf = _meta_str(meta, "codec.quantize")
    if vf not in QUANTIZERS:
        raise CodecError(f"unknown value format {vf!r}; allowed: {', '.join(QUANTIZERS)}")
    if kind in ("none", "fp16", "int8") and vf != kind:
        raise CodecError(f"codec {kind!r} with value format {vf!r} is inconsistent")
    coding = _meta_str(meta, "codec.index")
    if kind == "topk" and coding not in INDEX_CODINGS:
        raise CodecError(f"unknown index coding {coding!r}; allowed: {', '.join(INDEX_CODINGS)}")
    if kind != "topk" and coding != "none":
        raise CodecError(f"codec {kind!r} carries no indices but meta says index coding {coding!r}")

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

    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name in names:
        shape = _parse_shape(name, _meta_str(meta, f"{name}.shape"))
        if expected_shapes is not None and tuple(int(d) for d in expected_shapes[name]) != shape:
            raise CodecError(f"tensor {name!r}: shape {shape} differs from the expected {tuple(expected_shapes[name])}")
        shapes[name] = shape
        total += math.prod(shape)
        if expected_shapes is None and total > max_elements:
            raise CodecError(f"update claims more than max_elements={max_elements} elements")
        _meta_str(meta, f"{name}.dtype")

    expected_keys: set[str] = set()
    for name in names:
        expected_keys.add(f"{name}.val")
        if vf == "int8":
            expected_keys.add(f"{name}.scale")
        if kind == "topk":
            expected_keys.add(f"{name}.idx")
    got = set(encoded_arrays)
    if got != expected_keys:
        raise CodecError(
            f"array set mismatch: missing {_short(sorted(expected_keys - got))}, unexpected {_short(sorted(map(str, got - expected_keys)))}"
        )

    out: dict[str, np.ndarray] = {}
    for name in names:
        shape = shapes[name]
        n = math.prod(shape)
        count = _meta_int(meta, f"{name}.count")
        sel: np.ndarray | None = None
        if kind in ("none", "fp16", "int8"):
            if count != n:
                raise CodecError(f"tensor {name!r}: dense codec must send {n} values, meta says {count}")
        elif kind == "sparse_mask":
            assert mask is not None
            m = _find(mask, name)
            if m is None:
                if count != n:
                    raise CodecError(f"tensor {name!r} is unmasked: must send {n} values, meta says {count}")
            else:
                m = np.asarray(m)
                if m.dtype != np.bool_ or tuple(m.shape) != shape:
                    raise CodecError(f"tensor {name!r}: mask shape {tuple(m.shape)} does not match {shape}")
                sel = np.flatnonzero(m.ravel())
                if count != sel.size:
                    raise CodecError(f"tensor {name!r}: mask has {sel.size} active coordinates, meta says {count}")
        else:
            if not 0 <= count <= n:
                raise CodecError(f"tensor {name!r}: top-k count {count} outside [0, {n}]")
            sel = _decode_index(name, _array(encoded_arrays, f"{name}.idx", np.dtype(np.uint32 if coding == "uint32" else np.uint8)), n, count, coding)

        values = _dequantize(name, encoded_arrays, vf, count)
        if sel is None:
            out[name] = values.reshape(shape)
        else:
            full = np.zeros(n, dtype=np.float32)
            full[sel] = values
            out[name] = full.reshape(shape)
    return out


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


def _array(arrays: Mapping[str, Any], key: str, dtype: np.dtype) -> np.ndarray:
    """Fetch a 1-D payload array of exactly `dtype` (Flower `Array` objects are converted)."""
    a = arrays[key]
    if not isinstance(a, np.ndarray) and callable(getattr(a, "numpy", None)):
        a = a.numpy()
    if not isinstance(a, np.ndarray):
        raise CodecError(f"array {key!r} is a {type(a).__name__}, not a numpy array")
    if a.dtype != dtype:
        raise CodecError(f"array {key!r} has dtype {a.dtype}, expected {dtype}")
    if a.ndim != 1:
        raise CodecError(f"array {key!r} must be 1-D, got shape {a.shape}")
    return a


def _dequantize(name: str, arrays: Mapping[str, Any], fmt: str, count: int) -> np.ndarray:
    """Check and decode `count` values of tensor `name` to float32."""
    val = _array(arrays, f"{name}.val", _VALUE_DTYPES[fmt])
    if val.size != count:
        raise CodecError(f"tensor {name!r}: {val.size} values sent, meta says {count}")
    if fmt == "int8":
        scale = _array(arrays, f"{name}.scale", np.dtype(np.float32))
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


def _decode_index(name: str, raw: np.ndarray, n: int, count: int, coding: str) -> np.ndarray:
    """Decode and validate top-k indices: exactly `count`, strictly increasing, all < n."""
    if coding == "uint32":
        if raw.size != count:
            raise CodecError(f"tensor {name!r}: {raw.size} indices for {count} values")
        idx = raw.astype(np.int64)
        if count and np.any(np.diff(idx) <= 0):
            raise CodecError(f"tensor {name!r}: indices are not strictly increasing")
        if count and idx[-1] >= n:
            raise CodecError(f"tensor {name!r}: index out of range [0, {n})")
        return idx
    if coding == "bitmap":
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
    gaps = _varint_decode(name, raw)
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


def _varint_decode(name: str, raw: np.ndarray) -> np.ndarray:
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
