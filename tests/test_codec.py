"""Codec tests: round trips, unbiased int8, exact top-k, error feedback, byte counts, hostile payloads."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from fedseek.wire import codec as C
from fedseek.wire.codec import CodecError, CodecSpec, ErrorFeedback, decode, encode, payload_bytes
from fedseek.wire.codec.indices import varint_decode, varint_encode


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model-shaped update: a weight matrix, a bias and a conv kernel."""
    rng = np.random.default_rng(seed)
    return {
        "net.0.weight": rng.normal(size=(64, 30)).astype(np.float32),
        "net.0.bias": rng.normal(size=(64,)).astype(np.float32),
        "conv.weight": rng.normal(scale=0.01, size=(8, 4, 3, 3)).astype(np.float32),
    }


def _shapes(u: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in u.items()}


# ----------------------------------------------------------------------------- spec


def test_unknown_codec_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="allowed: none, fp16, int8, topk, sparse_mask"):
        CodecSpec(kind="zip")
    with pytest.raises(ValueError, match="allowed: none, fp16, int8"):
        CodecSpec(kind="topk", quantize="int4")
    with pytest.raises(ValueError, match="allowed: uint32, delta, bitmap"):
        CodecSpec(kind="topk", index_coding="golomb")
    with pytest.raises(ValueError, match="topk_fraction"):
        CodecSpec(kind="topk", topk_fraction=0.0)
    with pytest.raises(ValueError, match="quantize must be"):
        CodecSpec(kind="int8", quantize="fp16")
    with pytest.raises(ValueError, match="seed"):
        CodecSpec(kind="int8", seed=-1)


def test_encode_rejects_non_finite_and_fp16_overflow() -> None:
    u = _update()
    u["net.0.bias"][3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        encode(u, CodecSpec())
    with pytest.raises(ValueError, match="fp16 range"):
        encode({"w": np.array([1e6], np.float32)}, CodecSpec(kind="fp16"))


def test_error_feedback_requires_state() -> None:
    with pytest.raises(ValueError, match="ErrorFeedback"):
        encode(_update(), CodecSpec(kind="topk", error_feedback=True))


# ----------------------------------------------------------------------------- round trips


def test_none_is_exact_and_keeps_shapes() -> None:
    u = _update()
    enc = encode(u, CodecSpec(kind="none"))
    out = decode(enc.arrays, enc.meta, expected_shapes=_shapes(u))
    for k in u:
        assert out[k].dtype == np.float32 and out[k].shape == u[k].shape
        np.testing.assert_array_equal(out[k], u[k])


def test_fp16_within_half_precision_eps() -> None:
    u = _update()
    enc = encode(u, CodecSpec(kind="fp16"))
    out = decode(enc.arrays, enc.meta)
    for k in u:
        # round-to-nearest: relative error <= 2^-11, plus fp16's subnormal spacing 2^-24
        assert np.all(np.abs(out[k] - u[k]) <= np.abs(u[k]) * 2.0**-11 + 2.0**-24)


def test_int8_within_one_quantization_step() -> None:
    u = _update()
    enc = encode(u, CodecSpec(kind="int8", seed=3))
    out = decode(enc.arrays, enc.meta)
    for k in u:
        scale = float(enc.arrays[f"{k}.scale"][0])
        assert scale == pytest.approx(np.abs(u[k]).max() / 127, rel=1e-6)
        assert np.all(np.abs(out[k] - u[k]) <= scale * (1 + 1e-5))
        assert enc.arrays[f"{k}.val"].min() >= -127


def test_int8_stochastic_rounding_is_unbiased() -> None:
    step = 0.01
    x = np.full(2000, 0.3 * step, dtype=np.float32)
    x[0] = 127 * step  # fixes the scale; the rest sit 30% of a step above 0
    spec = CodecSpec(kind="int8", seed=11)
    rounds = 300
    acc = np.zeros_like(x, dtype=np.float64)
    for nonce in range(rounds):
        enc = encode({"w": x}, spec, nonce=nonce)
        acc += decode(enc.arrays, enc.meta)["w"]
    mean = acc / rounds
    # nearest rounding would give 0 everywhere (bias 0.3 step); stochastic rounding is unbiased
    assert abs(mean[1:].mean() - 0.3 * step) < 0.01 * step
    # per coordinate: std <= step/2/sqrt(rounds) ~ 0.029 step; allow ~5 sigma
    assert np.max(np.abs(mean[1:] - 0.3 * step)) < 0.15 * step


def test_int8_reproducible_by_seed_and_nonce() -> None:
    u = _update()
    a = encode(u, CodecSpec(kind="int8", seed=5), nonce=2).arrays
    b = encode(u, CodecSpec(kind="int8", seed=5), nonce=2).arrays
    c = encode(u, CodecSpec(kind="int8", seed=5), nonce=3).arrays
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_int8_all_zero_tensor() -> None:
    enc = encode({"w": np.zeros((3, 3), np.float32)}, CodecSpec(kind="int8", seed=0))
    assert enc.arrays["w.scale"][0] == 0
    np.testing.assert_array_equal(decode(enc.arrays, enc.meta)["w"], np.zeros((3, 3)))


@pytest.mark.parametrize("coding", C.INDEX_CODINGS)
@pytest.mark.parametrize("scope", C.TOPK_SCOPES)
def test_topk_keeps_exactly_k_largest(coding: str, scope: str) -> None:
    u = _update()
    spec = CodecSpec(kind="topk", topk_fraction=0.1, topk_scope=scope, index_coding=coding)
    enc = encode(u, spec)
    out = decode(enc.arrays, enc.meta, expected_shapes=_shapes(u))
    kept_total = 0
    for k, x in u.items():
        kept = out[k] != 0
        n_kept = int(kept.sum())
        assert enc.meta[f"{k}.count"] == n_kept
        np.testing.assert_array_equal(out[k][kept], x[kept])  # fp32 values: exact on kept coordinates
        if scope == "layer":
            assert n_kept == math.ceil(0.1 * x.size)
            assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
        kept_total += n_kept
    if scope == "global":
        allx = np.concatenate([x.ravel() for x in u.values()])
        assert kept_total == math.ceil(0.1 * allx.size)
        kept_vals = np.concatenate([np.abs(u[k][out[k] != 0]) for k in u])
        dropped = np.concatenate([np.abs(u[k][out[k] == 0]) for k in u])
        assert kept_vals.min() >= dropped.max()
        assert enc.meta["conv.weight.count"] == 0  # tiny-scale tensor loses out globally


@pytest.mark.parametrize("quantize", ["fp16", "int8"])
def test_topk_quantized_values_within_step(quantize: str) -> None:
    u = _update()
    enc = encode(u, CodecSpec(kind="topk", topk_fraction=0.05, quantize=quantize, seed=1))
    out = decode(enc.arrays, enc.meta)
    for k, x in u.items():
        kept = out[k] != 0
        if quantize == "int8":
            tol = float(enc.arrays[f"{k}.scale"][0]) * (1 + 1e-5)
        else:
            tol = np.abs(x[kept]) * 2.0**-11 + 2.0**-24
        assert np.all(np.abs(out[k][kept] - x[kept]) <= tol)


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    u = {"w": torch.randn(5, 4, requires_grad=True), "b": torch.randn(4, dtype=torch.bfloat16)}
    enc = encode(u, CodecSpec(kind="none"))
    out = decode(enc.arrays, enc.meta)
    np.testing.assert_array_equal(out["w"], u["w"].detach().numpy())
    assert enc.meta["b.dtype"] == "float32" and out["b"].shape == (4,)


def test_varint_roundtrip_large_values() -> None:
    vals = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1, 2**28, 2**32 - 1], dtype=np.uint64)
    raw = varint_encode(vals)
    assert raw.size == 1 + 1 + 1 + 2 + 2 + 3 + 4 + 4 + 5 + 5
    np.testing.assert_array_equal(varint_decode("t", raw), vals)


@pytest.mark.parametrize("coding", C.INDEX_CODINGS)
def test_topk_edge_indices(coding: str) -> None:
    x = np.zeros(300_001, np.float32)
    x[[0, 300_000]] = [5.0, -7.0]
    spec = CodecSpec(kind="topk", topk_fraction=2 / 300_001, index_coding=coding)
    enc = encode({"w": x}, spec)
    np.testing.assert_array_equal(decode(enc.arrays, enc.meta)["w"], x)


# ----------------------------------------------------------------------------- sparse mask


@pytest.mark.parametrize("quantize", C.QUANTIZERS)
def test_sparse_mask_sends_masked_values_only(quantize: str) -> None:
    u = _update()
    rng = np.random.default_rng(1)
    mask = {"_module.net.0.weight": rng.random((64, 30)) < 0.25}  # Opacus-prefixed key is tolerated
    m = mask["_module.net.0.weight"]
    u["net.0.weight"][~m] = 0.0  # as after MaskEnforcer
    enc = encode(u, CodecSpec(kind="sparse_mask", quantize=quantize, seed=0), mask=mask)
    assert "net.0.weight.idx" not in enc.arrays
    assert enc.arrays["net.0.weight.val"].size == int(m.sum())
    assert enc.arrays["net.0.bias.val"].size == 64  # not in the mask: dense
    out = decode(enc.arrays, enc.meta, mask={"net.0.weight": m}, expected_shapes=_shapes(u))
    assert np.all(out["net.0.weight"][~m] == 0)
    for k, x in u.items():
        if quantize == "none":
            np.testing.assert_array_equal(out[k], x)
        else:
            assert np.allclose(out[k], x, atol=np.abs(x).max() / 100)


def test_sparse_mask_error_feedback_drops_pruned() -> None:
    u = {"w": np.ones((4, 4), np.float32)}
    mask = {"w": np.eye(4, dtype=bool)}
    ef = ErrorFeedback()
    encode(u, CodecSpec(kind="sparse_mask", quantize="int8", error_feedback=True, seed=0), ef, mask=mask)
    assert np.all(ef.residual["w"][~mask["w"]] == 0)


# ----------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("quantize", C.QUANTIZERS)
def test_error_feedback_conserves_the_sum(quantize: str) -> None:
    spec = CodecSpec(kind="topk", topk_fraction=0.05, quantize=quantize, error_feedback=True, seed=7)
    ef = ErrorFeedback()
    total_in = {k: np.zeros(v.shape, np.float64) for k, v in _update().items()}
    total_out = {k: np.zeros_like(v) for k, v in total_in.items()}
    for r in range(15):
        u = _update(seed=100 + r)
        enc = encode(u, spec, ef, nonce=r)
        out = decode(enc.arrays, enc.meta)
        for k in u:
            total_in[k] += u[k]
            total_out[k] += out[k]
    for k in total_in:
        np.testing.assert_allclose(total_out[k] + ef.residual[k], total_in[k], atol=1e-4)


def test_error_feedback_carries_dropped_mass_to_next_round() -> None:
    spec = CodecSpec(kind="topk", topk_fraction=0.5, error_feedback=True)
    ef = ErrorFeedback()
    x = np.array([4.0, 3.0, 2.0, 1.0], np.float32)
    first = encode({"w": x}, spec, ef)
    np.testing.assert_array_equal(decode(first.arrays, first.meta)["w"], [4, 3, 0, 0])
    np.testing.assert_array_equal(ef.residual["w"], [0, 0, 2, 1])
    second = encode({"w": np.zeros(4, np.float32)}, spec, ef)
    np.testing.assert_array_equal(decode(second.arrays, second.meta)["w"], [0, 0, 2, 1])
    assert ef.norm() == 0.0


def test_error_feedback_state_dict_roundtrip() -> None:
    spec = CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", error_feedback=True, seed=1)
    a = ErrorFeedback()
    encode(_update(1), spec, a, nonce=1)
    saved = a.state_dict()
    b = ErrorFeedback()
    b.load_state_dict(saved)
    ea = encode(_update(2), spec, a, nonce=2)
    eb = encode(_update(2), spec, b, nonce=2)
    assert all(np.array_equal(ea.arrays[k], eb.arrays[k]) for k in ea.arrays)
    assert saved is not a.residual and not np.array_equal(saved["net.0.weight"], a.residual["net.0.weight"])
    with pytest.raises(ValueError, match="non-finite"):
        b.load_state_dict({"w": np.array([np.inf])})
    with pytest.raises(ValueError, match="shape"):
        encode({"net.0.weight": np.zeros((2, 2), np.float32)}, spec, b)


# ----------------------------------------------------------------------------- bytes


def test_exact_byte_counts() -> None:
    x = np.zeros(10_000, np.float32)
    x[::10] = np.linspace(1, 2, 1000)  # exactly 1000 large entries, evenly spaced: gaps of 9
    u = {"w": x}
    spec = CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", seed=0)
    # 1000 uint32 indices + 1000 int8 values + one float32 scale
    assert encode(u, spec).nbytes == 1000 * 4 + 1000 * 1 + 4 == 5004
    # delta varints: first index 0 and gaps-1 = 9 all fit one byte
    assert encode(u, CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", index_coding="delta", seed=0)).nbytes == 2004
    # bitmap: 10,000 bits = 1250 bytes
    assert encode(u, CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", index_coding="bitmap", seed=0)).nbytes == 2254
    assert encode(u, CodecSpec(kind="topk", topk_fraction=0.1, quantize="fp16")).nbytes == 1000 * 4 + 1000 * 2
    assert encode(u, CodecSpec(kind="none")).nbytes == 40_000
    assert encode(u, CodecSpec(kind="fp16")).nbytes == 20_000
    enc = encode(u, CodecSpec(kind="int8", seed=0))
    assert enc.nbytes == 10_004 == payload_bytes(enc.arrays)
    assert enc.dense_nbytes == 40_000 and enc.ratio == pytest.approx(40_000 / 10_004)
    mask = {"w": (np.arange(10_000) % 4 == 0)}
    assert encode(u, CodecSpec(kind="sparse_mask", quantize="int8", seed=0), mask=mask).nbytes == 2500 + 4
    assert encode(u, CodecSpec(kind="sparse_mask", quantize="fp16"), mask=mask).nbytes == 5000


# ----------------------------------------------------------------------------- trust boundary


def _good() -> tuple[dict[str, np.ndarray], dict, dict[str, tuple[int, ...]]]:
    u = {"w": np.random.default_rng(0).normal(size=(10, 10)).astype(np.float32)}
    enc = encode(u, CodecSpec(kind="topk", topk_fraction=0.2, quantize="int8", seed=0))
    return dict(enc.arrays), dict(enc.meta), _shapes(u)


def _set(d: dict, k: str, v: object) -> dict:
    d = dict(d)
    d[k] = v
    return d


def _drop(d: dict, k: str) -> dict:
    d = dict(d)
    del d[k]
    return d


_MUTATIONS = {
    "unknown codec": lambda a, m: (a, _set(m, "codec", "zip")),
    "wrong version": lambda a, m: (a, _set(m, "codec.version", 99)),
    "missing meta": lambda a, m: (a, _drop(m, "codec.tensors")),
    "bool count": lambda a, m: (a, _set(m, "w.count", True)),
    "count mismatch": lambda a, m: (a, _set(m, "w.count", 19)),
    "count too big": lambda a, m: (a, _set(m, "w.count", 101)),
    "tensors not json": lambda a, m: (a, _set(m, "codec.tensors", "[w")),
    "tensors not list": lambda a, m: (a, _set(m, "codec.tensors", '{"w": 1}')),
    "duplicate tensor": lambda a, m: (a, _set(m, "codec.tensors", '["w", "w"]')),
    "shape garbage": lambda a, m: (a, _set(m, "w.shape", "ten")),
    "negative shape": lambda a, m: (a, _set(m, "w.shape", "[-10, -10]")),
    "shape mismatch": lambda a, m: (a, _set(m, "w.shape", "[100]")),
    "wrong quantize": lambda a, m: (a, _set(m, "codec.quantize", "fp16")),
    "missing array": lambda a, m: (_drop(a, "w.scale"), m),
    "extra array": lambda a, m: (_set(a, "evil.val", np.zeros(3, np.float32)), m),
    "wrong dtype": lambda a, m: (_set(a, "w.val", a["w.val"].astype(np.float64)), m),
    "object dtype": lambda a, m: (_set(a, "w.val", np.array([object()] * 20)), m),
    "2-D array": lambda a, m: (_set(a, "w.val", a["w.val"].reshape(4, 5)), m),
    "truncated values": lambda a, m: (_set(a, "w.val", a["w.val"][:-1]), m),
    "not an array": lambda a, m: (_set(a, "w.val", [1, 2, 3]), m),
    "index out of range": lambda a, m: (_set(a, "w.idx", np.append(a["w.idx"][:-1], np.uint32(100))), m),
    "huge index": lambda a, m: (_set(a, "w.idx", np.append(a["w.idx"][:-1], np.uint32(2**32 - 1))), m),
    "duplicate index": lambda a, m: (_set(a, "w.idx", np.sort(np.append(a["w.idx"][:-1], a["w.idx"][0]))), m),
    "unsorted index": lambda a, m: (_set(a, "w.idx", a["w.idx"][::-1].copy()), m),
    "short index": lambda a, m: (_set(a, "w.idx", a["w.idx"][:-1]), m),
    "nan scale": lambda a, m: (_set(a, "w.scale", np.array([np.nan], np.float32)), m),
    "negative scale": lambda a, m: (_set(a, "w.scale", np.array([-1.0], np.float32)), m),
    "two scales": lambda a, m: (_set(a, "w.scale", np.ones(2, np.float32)), m),
    "int8 -128": lambda a, m: (_set(a, "w.val", np.full(20, -128, np.int8)), m),
}


@pytest.mark.parametrize("name", sorted(_MUTATIONS))
def test_malformed_payload_raises_codec_error(name: str) -> None:
    arrays, meta, shapes = _good()
    decode(arrays, meta, expected_shapes=shapes)  # the unmutated one is fine
    bad_arrays, bad_meta = _MUTATIONS[name](arrays, meta)
    with pytest.raises(CodecError):
        decode(bad_arrays, bad_meta, expected_shapes=shapes)


def test_unknown_codec_at_decode_lists_allowed() -> None:
    arrays, meta, _ = _good()
    with pytest.raises(CodecError, match="allowed: none, fp16, int8, topk, sparse_mask"):
        decode(arrays, _set(meta, "codec", "zip"))


def test_claims_beyond_max_elements_rejected_without_allocating() -> None:
    arrays, meta, _ = _good()
    with pytest.raises(CodecError, match="max_elements"):
        decode(arrays, _set(meta, "w.shape", "[1000000, 1000000]"))


def test_expected_shapes_reject_other_tensors() -> None:
    arrays, meta, _ = _good()
    with pytest.raises(CodecError, match="tensor set mismatch"):
        decode(arrays, meta, expected_shapes={"w": (10, 10), "b": (10,)})


@pytest.mark.parametrize("coding", ["delta", "bitmap"])
def test_malformed_compact_indices(coding: str) -> None:
    u = {"w": np.arange(1, 101, dtype=np.float32)}
    enc = encode(u, CodecSpec(kind="topk", topk_fraction=0.2, index_coding=coding))
    idx = enc.arrays["w.idx"]
    bad: list[np.ndarray] = [idx[:-1], np.append(idx, np.uint8(0))]
    if coding == "delta":
        bad += [np.append(idx[:-1], np.uint8(0x80)), np.full(6, 0x80, np.uint8), np.append(idx[:-1], np.uint8(120))]
    else:
        pad = idx.copy()
        pad[-1] |= 0x80  # bits beyond n=100 (100 bits = 12.5 bytes)
        bad += [pad, np.zeros_like(idx)]
    for b in bad:
        with pytest.raises(CodecError):
            decode(_set(enc.arrays, "w.idx", b), enc.meta, expected_shapes={"w": (100,)})


def test_sparse_mask_digest_and_missing_mask() -> None:
    m = np.zeros((8, 8), bool)
    m[::2] = True
    enc = encode({"w": np.ones((8, 8), np.float32)}, CodecSpec(kind="sparse_mask"), mask={"w": m})
    with pytest.raises(CodecError, match="needs the coordinator's mask"):
        decode(enc.arrays, enc.meta)
    other = m.copy()
    other[1, 1] = True
    with pytest.raises(CodecError, match="digest"):
        decode(enc.arrays, enc.meta, mask={"w": other})


def test_random_corruption_never_crashes() -> None:
    """Fuzz: flipped bytes and shuffled meta either decode to finite, right-shaped tensors or raise CodecError."""
    rng = np.random.default_rng(123)
    u = _update()
    specs = [
        CodecSpec(kind="topk", topk_fraction=0.1, quantize=q, index_coding=c, seed=0)
        for q in C.QUANTIZERS
        for c in C.INDEX_CODINGS
    ] + [CodecSpec(kind=k, seed=0) for k in ("none", "fp16", "int8")]
    decoded = rejected = 0
    for trial in range(300):
        spec = specs[trial % len(specs)]
        enc = encode(u, spec)
        clean = decode(enc.arrays, enc.meta, expected_shapes=_shapes(u))  # the valid input decodes
        assert all(clean[k].shape == u[k].shape for k in u)
        arrays = {k: v.copy() for k, v in enc.arrays.items()}
        meta = copy.deepcopy(enc.meta)
        key = sorted(arrays)[rng.integers(len(arrays))]
        raw = arrays[key].view(np.uint8)
        if raw.size:
            for _ in range(rng.integers(1, 4)):
                raw[rng.integers(raw.size)] ^= np.uint8(1 << rng.integers(8))
        if trial % 5 == 0:
            mk = sorted(meta)[rng.integers(len(meta))]
            junk: list[int | float | str] = [0, -1, "x", json.dumps([3]), 10**12]
            meta[mk] = junk[rng.integers(5)]
        try:
            out = decode(arrays, meta, expected_shapes=_shapes(u))
        except CodecError:
            rejected += 1
            continue
        decoded += 1
        for k, v in out.items():
            assert v.shape == u[k].shape and v.dtype == np.float32 and np.all(np.isfinite(v))
    assert decoded + rejected == 300 and decoded >= 30 and rejected >= 30  # both outcomes exercised


# ----------------------------------------------------------------------------- Flower records


def test_payload_travels_in_flower_records() -> None:
    flwr_app = pytest.importorskip("flwr.app")
    u = _update()
    mask = {"net.0.weight": np.random.default_rng(0).random((64, 30)) < 0.5}
    for spec in [
        CodecSpec(kind="topk", quantize="int8", index_coding="delta", seed=0),
        CodecSpec(kind="sparse_mask", quantize="fp16"),
        CodecSpec(kind="int8", seed=0),
    ]:
        enc = encode(u, spec, mask=mask)
        record = flwr_app.ArrayRecord(array_dict={k: flwr_app.Array(v) for k, v in enc.arrays.items()})
        config = flwr_app.ConfigRecord(dict(enc.meta))
        arrays = {k: v.numpy() for k, v in record.items()}
        direct = decode(enc.arrays, enc.meta, mask=mask)
        via = decode(arrays, dict(config), mask=mask, expected_shapes=_shapes(u))
        via_objects = decode(dict(record.items()), dict(config), mask=mask)  # Flower Array objects accepted
        for k in u:
            np.testing.assert_array_equal(direct[k], via[k])
            np.testing.assert_array_equal(direct[k], via_objects[k])


def _cnn_update(seed: int = 0) -> dict[str, np.ndarray]:
    """A delta shaped like the digits CNN (10 tensors, ~10k parameters)."""
    from fedseek.train.models import build_model

    rng = np.random.default_rng(seed)
    state = build_model("cnn", (1, 8, 8), 10).state_dict()
    return {k: rng.normal(0, 0.01, tuple(v.shape)).astype(np.float32) for k, v in state.items()}


@pytest.mark.parametrize("spec", [
    CodecSpec(),
    CodecSpec(kind="int8", seed=0),
    CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", index_coding="delta", seed=0),
    CodecSpec(kind="sparse_mask", quantize="int8", seed=0),
], ids=["none", "int8", "topk10-int8", "mask-int8"])
def test_packed_blob_roundtrip_and_wire_size(spec: CodecSpec) -> None:
    """The packed update decodes to exactly what the codec produced; its wire size is payload + one small header."""
    from flwr.app import ConfigRecord, RecordDict

    from fedseek.sparsity import init_mask
    from fedseek.wire.transfer import pack_update, to_record, unpack_update, update_wire_bytes

    u = _cnn_update()
    mask = init_mask(u, 0.8, seed=1) if spec.kind == "sparse_mask" else None
    enc = encode(u, spec, mask=mask, nonce=3)
    records, payload, dense = pack_update(u, spec, None, mask, nonce=3)
    content = RecordDict(records)
    delta, got_payload = unpack_update(content, _shapes(u), mask)
    direct = decode(enc.arrays, enc.meta, mask=mask)
    for k in u:
        np.testing.assert_array_equal(delta[k], direct[k])
    assert got_payload == payload == enc.nbytes and dense == 4 * sum(v.size for v in u.values())
    wire = update_wire_bytes(content)
    unpacked = RecordDict({"update": to_record(enc.arrays), "update-codec": ConfigRecord(dict(enc.meta))})
    assert payload < wire <= payload + 700, (payload, wire)  # one .npy header + the zlib'd meta
    assert wire < update_wire_bytes(unpacked)
    if spec.kind != "none":
        assert dense / wire >= (3.0 if spec.kind == "int8" else 10.0)


def test_packed_blob_rejects_malformed_bytes() -> None:
    from fedseek.wire.blob import pack_blob, unpack_blob

    enc = encode(_cnn_update(), CodecSpec(kind="topk", quantize="int8", seed=0))
    blob = pack_blob(enc.arrays, enc.meta)
    arrays, meta = unpack_blob(blob)
    assert meta == dict(enc.meta) and all(np.array_equal(arrays[k], v) for k, v in enc.arrays.items())
    hlen = int.from_bytes(blob[4:8].tobytes(), "little")
    bad = {
        "empty": blob[:0],
        "magic": np.concatenate([np.frombuffer(b"XXXX", np.uint8), blob[4:]]),
        "truncated": blob[:-1],
        "trailing": np.concatenate([blob, np.zeros(1, np.uint8)]),
        "header-length": np.concatenate([blob[:4], np.frombuffer((10**6).to_bytes(4, "little"), np.uint8), blob[8:]]),
        "header-garbage": np.concatenate([blob[:8], np.full(hlen, 7, np.uint8), blob[8 + hlen:]]),
        "dtype": blob.view(np.int8),
    }
    for _why, b in bad.items():
        with pytest.raises(CodecError):
            unpack_blob(b)
    # a header that inflates past the limit is refused without inflating it all
    import json as _json
    import struct
    import zlib

    bomb = zlib.compress(_json.dumps({"meta": {"x": "a" * (2 << 20)}, "arrays": []}).encode(), 9)
    raw = b"FSB1" + struct.pack("<I", len(bomb)) + bomb
    with pytest.raises(CodecError, match="inflates"):
        unpack_blob(np.frombuffer(raw, np.uint8))


def test_packed_blob_fuzz_never_crashes() -> None:
    """Flipped bytes anywhere in the blob either decode to finite, right-shaped tensors or raise CodecError."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedseek.wire.blob import PACKING
    from fedseek.wire.transfer import pack_update, unpack_update

    rng = np.random.default_rng(5)
    u = _cnn_update(1)
    records, _, _ = pack_update(u, CodecSpec(kind="topk", topk_fraction=0.1, quantize="int8", index_coding="delta", seed=0), None, None, 1)
    blob = records["update"]["blob"].numpy()
    clean = RecordDict({"update": ArrayRecord({"blob": Array(blob)}), "update-codec": ConfigRecord({"packing": PACKING})})
    assert set(unpack_update(clean, _shapes(u), None)[0]) == set(u)  # the valid input decodes
    decoded = rejected = 0
    for _ in range(200):
        b = blob.copy()
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(b.size)] ^= np.uint8(1 << rng.integers(8))
        content = RecordDict({"update": ArrayRecord({"blob": Array(b)}), "update-codec": ConfigRecord({"packing": PACKING})})
        try:
            out, _ = unpack_update(content, _shapes(u), None)
        except CodecError:
            rejected += 1
            continue
        decoded += 1
        for k, v in out.items():
            assert v.shape == u[k].shape and v.dtype == np.float32 and np.all(np.isfinite(v))
    assert decoded + rejected == 200 and decoded >= 20 and rejected >= 20  # both outcomes exercised
