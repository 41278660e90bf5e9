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

Modules: `spec` (CodecSpec, CodecError, EncodedUpdate), `sparse` (which coordinates are sent),
`values` (fp32/fp16/int8 value formats), `indices` (top-k index codings), `encoder` / `decoder`
(the meta and the per-tensor loop), `feedback` (error feedback); the mask digest is in `fedseek.wire.mask_bits`.
"""

from fedseek.names import CODECS, INDEX_CODINGS, QUANTIZERS, TOPK_SCOPES
from fedseek.wire.codec.decoder import decode
from fedseek.wire.codec.encoder import encode
from fedseek.wire.codec.feedback import ErrorFeedback
from fedseek.wire.codec.spec import DEFAULT_MAX_ELEMENTS, WIRE_VERSION, CodecError, CodecSpec, EncodedUpdate, payload_bytes
from fedseek.wire.mask_bits import mask_digest

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
