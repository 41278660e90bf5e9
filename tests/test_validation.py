"""Coordinator-side screening of site replies: malformed updates are rejected with a reason, never aggregated."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedseek.wire.blob import PACKING, pack_blob
from fedseek.wire.codec import CodecSpec
from fedseek.wire.screening import Bounds, as_messages, screen_replies
from fedseek.wire.transfer import pack_update


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


GLOBAL = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _none_meta() -> dict:
    from fedseek.wire.codec import encode

    return dict(encode({k: np.zeros_like(v) for k, v in GLOBAL.items()}, CodecSpec()).meta)


NO_CODEC = CodecSpec()


def _reply(delta=None, *, metrics=None, spec=NO_CODEC, site="s", refused=None, raw=None, meta=None) -> Message:
    content = RecordDict({"site": ConfigRecord({"name": site})})
    if refused:
        content["status"] = ConfigRecord({"refused": refused})
    elif raw is not None:
        content["update"] = ArrayRecord({"blob": Array(pack_blob(raw, meta or {"codec": "none"}))})
        content["update-codec"] = ConfigRecord({"packing": PACKING})
    else:
        delta = delta if delta is not None else {k: np.full_like(v, 0.1) for k, v in GLOBAL.items()}
        records, _, _ = pack_update(delta, spec, None, None, nonce=1)
        content.update(records)
    content["metrics"] = MetricRecord(metrics if metrics is not None else {"num-examples": 10, "train-loss": 0.5})
    return Message(content=content, dst_node_id=0, message_type="train")


def test_good_reply_is_decoded_into_full_weights():
    out = screen_replies([_reply()], Bounds(GLOBAL))
    assert len(out.accepted) == 1 and not out.rejected
    r = out.accepted[0]
    assert np.allclose(r.arrays["w"], 1.1) and np.allclose(r.arrays["b"], 0.1)
    assert out.bytes_up == 4 * 15 and r.update_norm == pytest.approx(np.sqrt(15 * 0.01))
    assert r.num_examples == 10 and r.metrics.train_loss == 0.5
    msgs = as_messages(out.accepted)
    assert msgs[0].content["metrics"]["num-examples"] == 10


@pytest.mark.parametrize(
    "reply, reason",
    [
        (lambda: _reply(raw={"w.val": np.full(12, np.nan, np.float32), "b.val": np.zeros(3, np.float32)}, meta=_none_meta()), "non-finite"),
        (lambda: _reply({"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32)}), "undecodable"),
        (lambda: _reply({"w": np.zeros((4, 3), np.float32)}), "undecodable"),
        (lambda: _reply(metrics={"train-loss": 0.1}), "num-examples"),
        (lambda: _reply(metrics={"num-examples": 0}), "num-examples"),
        (lambda: _reply(metrics={"num-examples": 10, "train-loss": float("inf")}), "train-loss"),
        (lambda: _reply(metrics={"num-examples": 10, "epsilon": -1.0}), "epsilon"),
        (lambda: _reply(raw={"junk": np.zeros(3, np.float32)}), "undecodable"),
        (lambda: _reply(raw={"big": np.zeros(10_000, np.float32)}), "oversize"),
        (lambda: _reply({k: np.full_like(v, 100.0) for k, v in GLOBAL.items()}), "norm"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(reply, reason):
    out = screen_replies([reply(), _reply(site="good")], Bounds(GLOBAL, max_update_norm=50.0, max_payload_bytes=1000))
    assert [r.site for r in out.accepted] == ["good"]
    assert len(out.rejected) == 1
    assert reason in out.rejected[0].reason
    assert out.rejected[0].site == "s"


def test_refusals_and_error_replies_are_sorted_out():
    from flwr.app import Error

    sent = Message(RecordDict(), dst_node_id=3, message_type="train")
    sent.metadata.__dict__["_message_id"] = "m-3"  # as Flower's Grid.push_messages sets it
    err = Message(Error(code=2, reason="ClientApp raised"), reply_to=sent)
    out = screen_replies([_reply(refused="budget spent"), err, _reply(site="ok")], Bounds(GLOBAL))
    assert [r.reason for r in out.refused] == ["budget spent"]
    assert len(out.failed) == 1 and "ClientApp raised" in out.failed[0].reason
    # the coordinator maps a failure to the node the message went to by this id (not by the sender)
    assert out.failed[0].reply_to == err.metadata.reply_to_message_id == "m-3"
    assert len(out.accepted) == 1


def test_compressed_update_round_trips_through_screening():
    rng = np.random.default_rng(0)
    delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    spec = CodecSpec(kind="topk", topk_fraction=0.5, quantize="int8", seed=1)
    out = screen_replies([_reply(delta, spec=spec)], Bounds(GLOBAL))
    assert len(out.accepted) == 1
    got = out.accepted[0].arrays["w"] - GLOBAL["w"]
    kept = got != 0
    assert 0 < kept.sum() <= 6 + 1
    assert np.allclose(got[kept], delta["w"][kept], atol=np.abs(delta["w"]).max() / 100)


# ---------------------------------------------------------------- bounds on what a site reports
def test_blob_header_depth_and_values_are_bounded():
    import struct
    import zlib

    from fedseek.wire.blob import unpack_blob
    from fedseek.wire.codec import CodecError

    arrays, meta = unpack_blob(pack_blob({"a.val": np.arange(3, dtype=np.float32)}, {"codec": "none", "n": 3, "x": 0.5}))
    assert np.array_equal(arrays["a.val"], [0, 1, 2]) and meta == {"codec": "none", "n": 3, "x": 0.5}
    for text, problem in [(b"[" * 100_000, "recursion limit"), (b'{"meta":{"a":NaN},"arrays":[]}', "meta.a"),
                          (b'{"meta":{"a":[1]},"arrays":[]}', "meta.a"), (b'{"meta":{},"arrays":[["a","uint8",-1]]}', "arrays.0.2")]:
        header = zlib.compress(text)
        with pytest.raises(CodecError, match=problem):
            unpack_blob(np.frombuffer(b"FSB1" + struct.pack("<I", len(header)) + header, np.uint8))


@pytest.mark.parametrize("key, value", [("num-examples", 10**9 + 1), ("num-examples", 2**63), ("epsilon", 1e7), ("train-loss", 1e13),
                                        ("steps", 10**13), ("train-seconds", -1.0)])
def test_reported_numbers_are_finite_and_bounded(key, value):
    from fedseek.wire.records import RecordError, TrainMetrics

    rec = MetricRecord({"num-examples": 10})
    rec[key] = value
    with pytest.raises(RecordError, match=f"'{key}'"):
        TrainMetrics.from_record(rec)


# ---------------------------------------------------------------- round-level influence bounds (the strategy wrapper)
class _Grid:
    """Three nodes that answer the tracker's name QUERY (the only Grid call the strategy makes)."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        from fedseek.wire.records import site_record

        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"q-{i}"
        return [Message(RecordDict({"site": site_record(f"site-{int(m.metadata.dst_node_id)}")}), reply_to=m) for m in messages]


def _strategy(rule: str = "fedavg", **validation):
    from fedseek.config import StrategySpec, ValidationSpec
    from fedseek.runtime.nodes import NodeTracker
    from fedseek.runtime.rules import build_rule
    from fedseek.runtime.strategy import SiteStrategy

    audit: list[tuple[str, dict]] = []
    nodes = NodeTracker(_Grid(), "run", lambda event, **f: audit.append((event, f)), node_wait_s=1, query_timeout_s=1)
    strategy = SiteStrategy(build_rule(StrategySpec(name=rule)), nodes, fraction_train=1.0, min_sites=1, seed=0,
                            validation=ValidationSpec(**validation))
    return strategy, audit


def _round(strategy, deltas: list[float], counts: list[int] | None = None, rnd: int = 1):
    """Sites 1..len(deltas) reply with a uniform delta each (the others time out); returns the aggregate's `b` (or None)."""
    from fedseek.wire.transfer import to_record

    sent = list(strategy.configure_train(rnd, to_record(GLOBAL), ConfigRecord({}), _Grid()))
    replies = []
    for i, (m, d) in enumerate(zip(sent, deltas, strict=False)):
        m.metadata.__dict__["_message_id"] = f"t-{rnd}-{i}"
        delta = {k: np.full_like(v, d) for k, v in GLOBAL.items()}
        n = counts[i] if counts else 100
        replies.append(Message(_reply(delta, metrics={"num-examples": n}, site=f"site-{i + 1}").content, reply_to=m))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else float(arrays["b"].numpy()[0])


def test_adaptive_norm_bound_rejects_only_the_outlier():
    strategy, audit = _strategy()
    assert _round(strategy, [0.1, 0.12, 1.0]) == pytest.approx(0.11)
    (rej,) = strategy.outcome.screened.rejected
    assert rej.site == "site-3" and "above bound" in rej.reason and "3x the round's median update norm" in rej.reason
    assert strategy.outcome.screened.bytes_up == 2 * 4 * 15  # the rejected payload is not counted as accepted traffic
    # a round with a single reply is held to the last reference
    assert _round(strategy, [1.0], rnd=2) is None and "last round's median" in strategy.outcome.screened.rejected[0].reason
    assert _round(strategy, [0.1], rnd=3) == pytest.approx(0.1)


def test_two_replies_do_not_set_the_reference_so_a_tiny_hostile_update_cannot_get_an_honest_one_rejected():
    strategy, _ = _strategy()
    # no reference yet: two replies alone set no bound, whatever their norms
    assert _round(strategy, [1e-6, 0.1]) == pytest.approx((1e-6 + 0.1) / 2)
    assert strategy.outcome.screened.rejected == []
    assert _round(strategy, [0.1, 0.12, 0.09], rnd=2) == pytest.approx(0.103333, rel=1e-4)  # three replies: reference 0.1
    # a near-zero update from a hostile site beside one honest site: the honest one (3.7x the tiny one) is kept,
    # held to the last three-reply reference instead
    assert _round(strategy, [1e-6, 0.25], rnd=3) == pytest.approx((1e-6 + 0.25) / 2)
    assert strategy.outcome.screened.rejected == []
    assert _round(strategy, [1e-6, 0.5], rnd=4) == pytest.approx(1e-6)  # 5x the last reference: still rejected
    assert "last round's median" in strategy.outcome.screened.rejected[0].reason


def test_norm_bounds_can_be_fixed_or_off_and_an_exploding_aggregate_is_never_taken():
    fixed, _ = _strategy(norm_bound="off", max_update_norm=3.0)  # norms: 0.387 per 0.1 of delta (15 coordinates)
    assert _round(fixed, [0.1, 0.12, 0.5]) == pytest.approx(0.24)  # 0.5 is 4x the median: allowed with the adaptive bound off
    assert _round(fixed, [0.1, 0.1, 1.0], rnd=2) == pytest.approx(0.1)  # norm 3.87: above the fixed bound
    assert "above bound 3" in fixed.outcome.screened.rejected[0].reason
    strategy, audit = _strategy(norm_bound="off")
    assert _round(strategy, [0.1, 0.1, 1e7]) is None  # accepted (no bound), but the aggregate's weights exceed max_global_abs
    assert len(strategy.outcome.screened.accepted) == 3 and "max_global_abs" in (strategy.outcome.model_kept or "")
    assert [e for e, _ in audit].count("global_model_kept") == 1
    off, _ = _strategy(norm_bound="off", max_global_abs=None)
    assert _round(off, [0.1, 0.1, 1e7]) == pytest.approx(1e7 / 3, rel=1e-3)  # every bound off: the operator's explicit choice


def test_weights_are_bounded_by_the_median_and_the_declared_maximum():
    strategy, audit = _strategy()
    assert _round(strategy, [0.1, 0.1, 0.2], [100, 100, 10**6]) == pytest.approx((10 + 10 + 300 * 0.2) / 500)
    (b,) = strategy.outcome.bounded
    assert b.site == "site-3" and "counted as 300" in b.reason and audit[-1][0] == "update_bounded"
    declared, _ = _strategy(max_examples={"site-3": 100})
    assert _round(declared, [0.1, 0.1, 0.2], [100, 100, 250]) == pytest.approx((10 + 10 + 20) / 300)
    assert "declared max_examples" in declared.outcome.bounded[0].reason
    trusting, _ = _strategy(weight_multiple=None)
    assert _round(trusting, [0.1, 0.1, 0.2], [100, 100, 10**6]) == pytest.approx(0.2, abs=1e-4) and not trusting.outcome.bounded


def test_a_rule_that_raises_keeps_the_model_and_its_state():
    strategy, audit = _strategy("fedadam")
    assert _round(strategy, [0.1, 0.1, 0.1]) is not None
    m_t = strategy.inner.m_t
    real = strategy.inner.aggregate_train

    def broken(rnd, msgs):
        real(rnd, msgs)  # updates FedAdam's moments, then fails
        raise RuntimeError("boom")

    strategy.inner.aggregate_train = broken
    assert _round(strategy, [0.1, 0.1, 0.1], rnd=2) is None
    assert "FedAdam raised RuntimeError: boom" in (strategy.outcome.model_kept or "")
    assert strategy.inner.m_t is m_t and audit[-1][0] == "global_model_kept"


def test_aggregate_check_names_what_is_wrong():
    from fedseek.config import ValidationSpec
    from fedseek.runtime.influence import InfluenceBounds, lower_median

    check = InfluenceBounds(ValidationSpec()).check_aggregate
    assert check(GLOBAL, GLOBAL) == ""
    assert "non-finite" in check({"w": np.full((4, 3), np.nan, np.float32), "b": GLOBAL["b"]}, GLOBAL)
    assert "all-zero" in check({k: np.zeros_like(v) for k, v in GLOBAL.items()}, GLOBAL)
    assert "max_global_abs" in check({"w": np.full((4, 3), 2e6, np.float32), "b": GLOBAL["b"]}, GLOBAL)
    assert "shapes" in check({"w": np.ones((3, 3), np.float32), "b": GLOBAL["b"]}, GLOBAL)
    assert lower_median([5.0, 1.0, 9.0, 7.0]) == 5.0 and lower_median([3.0]) == 3.0 and lower_median([]) is None


@pytest.mark.parametrize("text, key", [("norm_bound: sometimes", "norm_bound"), ("norm_multiple: 1", "norm_multiple"),
                                       ("weight_multiple: 0.5", "weight_multiple"), ("max_examples: {'bad name': 5}", "max_examples"),
                                       ("max_examples: {site-1: 0}", "max_examples"), ("max_global_abs: -1", "max_global_abs")])
def test_validation_config_names_the_bad_key(text, key):
    import yaml
    from pydantic import ValidationError

    from fedseek.config import ValidationSpec

    with pytest.raises(ValidationError, match=key):
        ValidationSpec.model_validate(yaml.safe_load(text))
    assert ValidationSpec.model_validate(yaml.safe_load("norm_bound: off")).norm_bound == "off"  # YAML 1.1 reads `off` as false
