"""Fuzzing reply screening: whatever a site sends, screening returns accept-or-reject with a reason and never raises.

Hundreds of replies mutated from valid ones (seeded, so every run sees the same cases): blob
bytes, blob headers (deep nesting, NaN, huge numbers, wrong types, zip bombs), codec meta,
extra / missing / retyped / reshaped arrays, metric records with inf / NaN / negative / huge /
wrongly typed / missing values, broken record structure. Then whole rounds of such replies go
through the strategy wrapper: it never raises and never returns a non-finite model.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedseek.config import ValidationSpec
from fedseek.runtime.nodes import NodeTracker
from fedseek.runtime.rules import build_rule
from fedseek.runtime.strategy import SiteStrategy
from fedseek.wire.blob import PACKING, pack_blob, unpack_blob
from fedseek.wire.codec import CodecSpec
from fedseek.wire.records import MAX_EXAMPLES, site_record
from fedseek.wire.screening import Bounds, screen_replies
from fedseek.wire.transfer import pack_update, to_record

SEED = 20240515
CASES = 400
GLOBAL = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
SPECS = [CodecSpec(), CodecSpec(kind="fp16"), CodecSpec(kind="topk", topk_fraction=0.5, quantize="int8", seed=1)]


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


def valid_content(rng: np.random.Generator, site: str = "s") -> RecordDict:
    """An honest reply: a small random update under one of the codecs, honest metrics."""
    delta = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    records, _, _ = pack_update(delta, SPECS[int(rng.integers(len(SPECS)))], None, None, nonce=int(rng.integers(1 << 30)))
    return RecordDict({**records, "site": site_record(site), "metrics": MetricRecord({"num-examples": 50, "train-loss": 0.4})})


# ---------------------------------------------------------------- mutations (each returns the content to send)
HOSTILE_VALUES: list[Any] = [math.inf, -math.inf, math.nan, -1, 0, -1e300, 1e12, 1e300, 10**30, 2**63, 3.5, 1e-300, [1, 2], [math.nan],
                             "10", None, True, b"\x00", {"a": 1}]
HEADER_TEXTS: list[bytes] = [
    b"[" * 100_000, b'{"meta":' * 50_000, b'{"meta":{"a":NaN},"arrays":[]}', b'{"meta":{"a":1e400},"arrays":[]}',
    b'{"meta":{"a":' + b"9" * 5000 + b'},"arrays":[]}', b'{"meta":{},"arrays":[["w.val","float32",-1]]}',
    b'{"meta":{},"arrays":[["w.val","float32",1099511627776]]}', b'{"meta":{},"arrays":[["w.val","float64",3]]}',
    b'{"meta":{},"arrays":[["a","uint8",0],["a","uint8",0]]}', b'{"meta":{"x":[1,2]},"arrays":[]}', b'{"meta":{"x":true},"arrays":[]}',
    b'{"meta":{"x":null},"arrays":[]}', b'{"meta":[],"arrays":{}}', b'{"meta":{},"arrays":[],"extra":1}', b"\xff\xfe not json",
    b'"' + b"a" * 200_000 + b'"', b'{"meta":{},"arrays":[' + b'["a","uint8",0],' * 5000 + b'["z","uint8",0]]}', b"",
]


def _blob(content: RecordDict) -> np.ndarray:
    return np.asarray(content.array_records["update"]["blob"].numpy())


def _with_blob(content: RecordDict, blob: np.ndarray) -> RecordDict:
    content["update"] = ArrayRecord({"blob": Array(np.ascontiguousarray(blob))})
    return content


def m_blob_bytes(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Flip, truncate, extend or replace the blob's bytes."""
    raw = _blob(c).copy()
    op = int(rng.integers(5))
    if op == 0:
        idx = rng.integers(0, raw.size, size=int(rng.integers(1, 8)))
        raw[idx] = rng.integers(0, 256, size=idx.size, dtype=np.uint8)
    elif op == 1:
        raw = raw[: int(rng.integers(0, raw.size))]
    elif op == 2:
        raw = np.concatenate([raw, rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8)])
    elif op == 3:
        raw = rng.integers(0, 256, size=int(rng.integers(0, 512)), dtype=np.uint8)
    else:
        raw[4:8] = np.frombuffer(struct.pack("<I", int(rng.integers(0, 1 << 32))), np.uint8)
    return _with_blob(c, raw)


def m_header(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Replace the header with hostile JSON (or a zip bomb), keeping the array bytes."""
    text = HEADER_TEXTS[int(rng.integers(len(HEADER_TEXTS)))] if rng.random() < 0.85 else b"[" * (4 << 20)  # inflates past the cap
    header = zlib.compress(text, 9)
    raw = b"FSB1" + struct.pack("<I", len(header)) + header + bytes(int(rng.integers(0, 64)))
    return _with_blob(c, np.frombuffer(raw, np.uint8).copy())


def m_meta(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Change, drop or add one codec meta value."""
    arrays, meta = unpack_blob(_blob(c))
    key = sorted(meta)[int(rng.integers(len(meta)))]
    op = int(rng.integers(3))
    if op == 0:
        del meta[key]
    else:
        value = [-1, 0, 2**62, 1.5, "", "[", '["w"]', json.dumps([1 << 40, 3]), "[[[[[[[[", '["w","w"]', "x" * 1000][int(rng.integers(11))]
        meta[key if op == 1 else f"extra.{int(rng.integers(99))}"] = value
    return _with_blob(c, pack_blob(arrays, meta))


def m_arrays(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Extra, missing, retyped, resized or poisoned payload arrays."""
    arrays, meta = unpack_blob(_blob(c))
    name = sorted(arrays)[int(rng.integers(len(arrays)))]
    op = int(rng.integers(6))
    if op == 0:
        arrays["extra.val"] = rng.normal(size=int(rng.integers(1, 20))).astype(np.float32)
    elif op == 1:
        del arrays[name]
    elif op == 2:
        arrays[name] = arrays[name].astype([np.int8, np.uint8, np.float16, np.uint32][int(rng.integers(4))])
    elif op == 3:
        arrays[name] = np.resize(arrays[name], max(0, arrays[name].size + int(rng.integers(-3, 4))))
    elif op == 4 and arrays[name].dtype.kind == "f":
        poisoned = arrays[name].copy()
        with np.errstate(over="ignore"):  # 3e38 overflows a float16 payload to inf: also hostile
            poisoned[int(rng.integers(poisoned.size))] = [np.nan, np.inf, -np.inf, 3e38, -3e38][int(rng.integers(5))]
        arrays[name] = poisoned
    else:
        arrays[name] = rng.integers(0, 256, size=arrays[name].size * arrays[name].itemsize, dtype=np.uint8).view(arrays[name].dtype)
    return _with_blob(c, pack_blob(arrays, meta))


def m_metrics(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Hostile metric values (including types Flower's constructor refuses, set underneath it), or missing keys."""
    rec = MetricRecord({"num-examples": 50, "train-loss": 0.4})
    keys = ["num-examples", "train-loss", "epsilon", "delta", "steps", "payload-bytes", "sample-rate", "dp-steps-total"]
    key = keys[int(rng.integers(len(keys)))]
    if rng.random() < 0.15:
        del rec["num-examples"]
    else:
        rec._data[key] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    c["metrics"] = rec
    return c


def m_structure(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """Records missing, doubled, of the wrong kind, or with odd names and statuses."""
    op = int(rng.integers(8))
    if op == 0:
        del c["update"]
    elif op == 1:
        c["update"] = ArrayRecord({"blob": Array(_blob(c)), "more": Array(np.zeros(3, np.float32))})
    elif op == 2:
        c["update-codec"] = ConfigRecord({"packing": ["fedseek-blob-0", PACKING * 50, ""][int(rng.integers(3))]})
    elif op == 3:
        c["update"] = ArrayRecord({"blob": Array(_blob(c).astype(np.float32))})
    elif op == 4:
        c["update"] = ArrayRecord({"blob": Array(np.resize(_blob(c), (2, 8)))})
    elif op == 5:
        c["site"] = ConfigRecord({"name": [b"\x00" * 10, "x" * 100_000, ["a", "b"], 12][int(rng.integers(4))]})
    elif op == 6:
        c["status"] = ConfigRecord({"refused": [b"\xff", "", ["why"], 1e308][int(rng.integers(4))]})
    else:
        del c["metrics"]
        c["metrics-again"] = ConfigRecord({"num-examples": "50"})
    return c


NPY_EDITS = [(b"'shape': (", b"'shape': (99999999999999, "), (b"'shape': (", b"'shape': (3, "), (b"'|u1'", b"'|O'"), (b"'|u1'", b"'<f8'"),
             (b"'shape': (", b"'shape': (((((("), (b"{", b"{{{{{{{{"), (b"False", b"True")]


def m_npy(rng: np.random.Generator, c: RecordDict) -> RecordDict:
    """The Array carrying the blob: its .npy header claims another shape or dtype (even pickled objects), or it is no .npy at all."""
    data = c.array_records["update"]["blob"].data
    if rng.random() < 0.2:
        data = rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    else:
        hlen = int.from_bytes(data[8:10], "little")  # .npy 1.0: magic, version, u16 header length, header dict padded with spaces
        old, new = NPY_EDITS[int(rng.integers(len(NPY_EDITS)))]
        header = data[10 : 10 + hlen].rstrip().replace(old, new, 1)
        data = data[:10] + header.ljust(hlen - 1)[: hlen - 1] + b"\n" + data[10 + hlen :]
    stype = "numpy.ndarray" if rng.random() < 0.9 else "torch.tensor"
    c["update"] = ArrayRecord({"blob": Array(dtype="uint8", shape=(1,), stype=stype, data=bytes(data))})
    return c


MUTATIONS: list[Callable[[np.random.Generator, RecordDict], RecordDict]] = [m_blob_bytes, m_header, m_meta, m_arrays, m_metrics,
                                                                            m_structure, m_npy]


def fuzzed(rng: np.random.Generator, site: str = "s") -> tuple[str, RecordDict]:
    """(mutation name, content): one or two mutations of a valid reply, or the valid reply itself (1 in 10)."""
    c = valid_content(rng, site)
    if rng.random() < 0.1:
        return "valid", c
    names = []
    for _ in range(1 + int(rng.random() < 0.3)):
        mutate = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
        names.append(mutate.__name__)
        try:
            c = mutate(rng, c)
        except Exception:  # a second mutation that needs a readable blob or Array: the first one stands
            names[-1] += "(skipped)"
    return "+".join(names), c


def _msg(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=0, message_type="train")


def test_screening_never_raises_and_always_gives_a_verdict():
    rng = np.random.default_rng(SEED)
    verdicts: dict[str, int] = {"accepted": 0, "rejected": 0, "refused": 0}
    bounds = Bounds(GLOBAL, max_payload_bytes=1 << 16)
    for i in range(CASES):
        name, content = fuzzed(rng)
        out = screen_replies([_msg(content)], bounds)  # must not raise
        got = {"accepted": out.accepted, "rejected": out.rejected, "refused": out.refused}
        assert sum(len(v) for v in got.values()) == 1 and not out.failed, f"case {i} ({name}): {got}"
        verdict = next(k for k, v in got.items() if v)
        verdicts[verdict] += 1
        if verdict == "accepted":
            r = out.accepted[0]
            assert set(r.arrays) == set(GLOBAL) and all(r.arrays[k].shape == GLOBAL[k].shape for k in GLOBAL), f"case {i} ({name})"
            assert all(np.all(np.isfinite(a)) for a in r.arrays.values()) and math.isfinite(r.update_norm), f"case {i} ({name})"
            assert 0 < r.num_examples <= MAX_EXAMPLES, f"case {i} ({name})"
        else:
            reason = got[verdict][0].reason
            assert isinstance(reason, str) and 0 < len(reason) <= 600, f"case {i} ({name}): {reason!r}"
    # the generator reaches every verdict: the test would notice screening accepting everything or nothing
    assert verdicts["accepted"] >= CASES // 20 and verdicts["rejected"] >= CASES // 2 and verdicts["refused"] >= 1, verdicts


@pytest.mark.parametrize("text", HEADER_TEXTS[:5], ids=["nested-list", "nested-object", "nan", "inf", "huge-int"])
def test_hostile_header_is_one_rejection_naming_the_header(text):
    header = zlib.compress(text, 9)
    c = _with_blob(valid_content(np.random.default_rng(0)), np.frombuffer(b"FSB1" + struct.pack("<I", len(header)) + header, np.uint8))
    out = screen_replies([_msg(c), _msg(valid_content(np.random.default_rng(1), site="good"))], Bounds(GLOBAL))
    assert [r.site for r in out.accepted] == ["good"] and len(out.rejected) == 1
    assert "header" in out.rejected[0].reason and "undecodable" in out.rejected[0].reason


@pytest.mark.parametrize("value", [math.inf, math.nan, -5, 0, 1e12, 10**30, 2**64, 3.5, [10]])
def test_hostile_num_examples_is_rejected_naming_the_key(value):
    c = valid_content(np.random.default_rng(0))
    c["metrics"] = MetricRecord({"train-loss": 0.4})
    c["metrics"]._data["num-examples"] = value
    out = screen_replies([_msg(c)], Bounds(GLOBAL))
    assert not out.accepted and "num-examples" in out.rejected[0].reason


class _Grid:
    """Three nodes that answer the tracker's name QUERY (the only Grid call the strategy makes)."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"q-{i}"
            out.append(Message(RecordDict({"site": site_record(f"site-{int(m.metadata.dst_node_id)}")}), reply_to=m))
        return out


@pytest.mark.parametrize("rule", ["fedavg", "fedadam", "fedmedian", "krum"])
def test_rounds_of_fuzzed_replies_never_fail_the_strategy(rule):
    """Two honest replies and one fuzzed reply per round: the wrapper returns a finite model (or keeps the old one), never raises."""
    from fedseek.config import StrategySpec

    rng = np.random.default_rng(SEED + 1)
    audit: list[tuple[str, dict]] = []
    grid = _Grid()
    nodes = NodeTracker(grid, "run", lambda event, **f: audit.append((event, f)), node_wait_s=1, query_timeout_s=1)
    strategy = SiteStrategy(build_rule(StrategySpec(name=rule, num_malicious=1)), nodes, fraction_train=1.0, min_sites=3, seed=0,
                            validation=ValidationSpec())
    for rnd in range(1, 31):
        sent = list(strategy.configure_train(rnd, to_record(GLOBAL), ConfigRecord({}), grid))
        replies = []
        for i, m in enumerate(sent):
            m.metadata.__dict__["_message_id"] = f"t-{rnd}-{i}"
            content = valid_content(rng, site=f"site-{i + 1}") if i else fuzzed(rng, site="site-1")[1]
            replies.append(Message(content, reply_to=m))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        screened = strategy.outcome.screened
        impersonations = len(getattr(getattr(nodes, "round", None), "impersonations", []))  # a garbled name: rejected by identity
        assert len(screened.accepted) + len(screened.rejected) + len(screened.refused) + impersonations == 3
        assert {r.site for r in screened.accepted} >= {"site-2", "site-3"}  # honest replies are never the ones rejected
        if arrays is not None:
            assert all(np.all(np.isfinite(a.numpy())) for a in arrays.values())
        else:
            assert strategy.outcome.model_kept and any(e == "global_model_kept" for e, _ in audit)
