"""Codec settings and the encoded update: which codec, its bounds, and what travels (post-processing of DP releases)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedseek.names import CODECS, INDEX_CODINGS, QUANTIZERS, TOPK_SCOPES

WIRE_VERSION = 1


DEFAULT_MAX_ELEMENTS = 1 << 27  # decode refuses claims above this unless told the shapes


class CodecError(ValueError):
    """A received encoded update is malformed or inconsistent with its meta (trust boundary)."""


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


def payload_array(arrays: Mapping[str, Any], key: str, dtype: np.dtype) -> np.ndarray:
    """Fetch a received 1-D payload array of exactly `dtype` (Flower `Array` objects are converted)."""
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
