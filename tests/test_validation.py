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
def _task_identity():
    """Flower Messages need the process' task identity (set by Flower inside a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


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
