"""Screening of site replies before aggregation: a bad reply is rejected with a reason, never aggregated.

A stock Flower strategy aborts the whole run on one inconsistent reply (measured), so every
reply is decoded and checked here (metrics schema, payload size, codec, shapes, finiteness,
norm bound) and the strategy only ever sees clean, uniform messages. Each reply is screened in
isolation: whatever it holds (a nested or huge blob header, inf/NaN/huge numbers, wrong types,
extra or missing arrays), the worst outcome is that this one reply is rejected with a reason;
no exception leaves `screen_replies`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from fedseek.wire.records import METRICS, RecordError, RefusalMetrics, TrainMetrics, refusal_reason, site_name
from fedseek.wire.transfer import to_record, unpack_update, update_wire_bytes

log = logging.getLogger(__name__)


@dataclass
class SiteReply:
    """A reply that passed validation: full local weights (global + delta) plus its typed metrics."""

    node_id: int
    site: str
    arrays: dict[str, np.ndarray]
    metrics: TrainMetrics
    payload_bytes: int = 0
    update_norm: float = 0.0
    wire_bytes: int = 0
    weight: int | None = None  # num-examples counted in aggregation when bounded below the reported count

    @property
    def num_examples(self) -> int:
        """The number of examples the site reported."""
        return self.metrics.num_examples

    @property
    def aggregation_weight(self) -> int:
        """The weight of this reply in FedAvg-style aggregation: the reported count, or its bound."""
        return self.num_examples if self.weight is None else self.weight


@dataclass
class Issue:
    """A reply that was not aggregated: which node and site, and why."""

    node_id: int
    site: str
    reason: str
    reply_to: str = ""  # id of the message it answers (error replies come from the SuperLink's node id)
    refusal: RefusalMetrics | None = None


@dataclass
class Screened:
    """Outcome of screening one round's replies."""

    accepted: list[SiteReply] = field(default_factory=list)
    rejected: list[Issue] = field(default_factory=list)  # malformed or out of bounds
    refused: list[Issue] = field(default_factory=list)  # the site declined (privacy budget)
    failed: list[Issue] = field(default_factory=list)  # error replies (crash, drop-out)
    bytes_up: int = 0  # exact codec payload bytes of accepted updates
    wire_bytes_up: int = 0  # the update's Flower records: packed blob (payload + codec meta) + framing


@dataclass(frozen=True)
class Bounds:
    """What a reply must respect against the current global model."""

    global_arrays: dict[str, np.ndarray]
    mask: dict[str, np.ndarray] | None = None
    max_update_norm: float | None = None
    max_payload_bytes: int | None = None


def screen_replies(replies: Iterable[Message], bounds: Bounds) -> Screened:
    """Sort replies into accepted / rejected / refused / failed; accepted ones are decoded into full weights."""
    out = Screened()
    for msg in replies:
        node, site = _sender(msg)
        try:
            _screen_one(msg, node, site, bounds, out)
        except Exception as exc:  # per-reply isolation: nothing a site sends may fail the round
            reason = f"reply could not be screened ({type(exc).__name__}: {str(exc)[:200]})"
            out.rejected.append(Issue(node, site, reason))
            log.warning("rejected reply from site %s (node %s): %s", site, node, reason)
    return out


def _sender(msg: Message) -> tuple[int, str]:
    """(node id, site name the reply carries), as far as they can be read."""
    try:
        node = int(msg.metadata.src_node_id)
    except Exception:  # a reply without a readable sender: node 0
        node = 0
    try:
        site = "" if msg.has_error() else site_name(msg.content)
    except Exception:  # a reply without a readable name
        site = ""
    return node, site


def _screen_one(msg: Message, node: int, site: str, bounds: Bounds, out: Screened) -> None:
    """Sort one reply into `out` (may raise: the caller turns that into a rejection)."""
    if msg.has_error():
        reason = f"error reply (code {msg.error.code}): {str(msg.error.reason)[:300]}"
        out.failed.append(Issue(node, "", reason, reply_to=msg.metadata.reply_to_message_id))
        log.warning("node %s: %s", node, reason)
        return
    content = msg.content
    refused = refusal_reason(content)
    if refused is not None:
        out.refused.append(Issue(node, site, refused, refusal=_refusal_metrics(content)))
        log.warning("site %s (node %s) refused the round: %s", site, node, refused)
        return
    reason, reply = check_update(content, bounds)
    if reply is None:
        out.rejected.append(Issue(node, site, reason))
        log.warning("rejected update from site %s (node %s): %s", site, node, reason)
        return
    reply.node_id, reply.site, reply.wire_bytes = node, site, update_wire_bytes(content)
    out.bytes_up += reply.payload_bytes
    out.wire_bytes_up += reply.wire_bytes
    out.accepted.append(reply)


def _refusal_metrics(content: RecordDict) -> RefusalMetrics:
    try:
        return RefusalMetrics.from_record(content.metric_records.get(METRICS, MetricRecord()))
    except Exception as exc:  # RecordError, or a record Flower itself cannot read
        log.warning("refusal with unreadable metrics (%s): kept without them", str(exc)[:300])
        return RefusalMetrics()


def check_update(content: RecordDict, bounds: Bounds) -> tuple[str, SiteReply | None]:
    """One reply's update against the bounds: ("", reply) when acceptable, (reason, None) otherwise."""
    if "update" not in content.array_records or "update-codec" not in content.config_records:
        return "no 'update' / 'update-codec' record in reply", None
    if METRICS not in content.metric_records:
        return "no 'metrics' record in reply", None
    try:
        metrics = TrainMetrics.from_record(content.metric_records[METRICS])
    except RecordError as exc:
        return str(exc)[:300], None
    shapes = {k: tuple(v.shape) for k, v in bounds.global_arrays.items()}
    size = update_wire_bytes(content)
    if bounds.max_payload_bytes is not None and size > bounds.max_payload_bytes:
        return f"oversize payload: {size} bytes > limit {bounds.max_payload_bytes}", None
    try:
        delta, payload = unpack_update(content, shapes, bounds.mask)
    except Exception as exc:  # CodecError for anything the decoder checks; any other error is the same verdict
        return f"undecodable update ({type(exc).__name__}: {str(exc)[:200]})", None
    reason = _delta_problem(delta, shapes)
    if reason:
        return reason, None
    norm = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values())))
    if bounds.max_update_norm is not None and norm > bounds.max_update_norm:
        return f"update norm {norm:.3g} above bound {bounds.max_update_norm:g}", None
    with np.errstate(over="ignore", invalid="ignore"):
        arrays = {k: (bounds.global_arrays[k] + delta[k]).astype(np.float32) for k in shapes}
    if not all(np.all(np.isfinite(a)) for a in arrays.values()):
        return "non-finite weights (float32 overflow) after applying the update", None
    return "", SiteReply(0, "", arrays, metrics, payload_bytes=int(payload), update_norm=norm)


def _delta_problem(delta: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(shapes) - set(delta))
    if missing:
        return f"update lacks tensors {missing[:3]}"
    for k, d in delta.items():
        if d.shape != shapes[k]:
            return f"wrong shape for {k}: {d.shape} != {shapes[k]}"
        if not np.all(np.isfinite(d)):
            return f"non-finite values (NaN/Inf) in {k}"
    return ""


def as_messages(accepted: list[SiteReply]) -> list[Message]:
    """Uniform messages (one ArrayRecord, one MetricRecord with num-examples) for Flower's strategies."""
    msgs = []
    for r in accepted:
        content = RecordDict(
            {
                "arrays": to_record(r.arrays),
                "metrics": MetricRecord({"num-examples": r.aggregation_weight}),
            }
        )
        msgs.append(Message(content=content, dst_node_id=0, message_type="train"))
    return msgs
