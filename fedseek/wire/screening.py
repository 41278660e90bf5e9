"""Validation of site replies before aggregation: a bad reply is rejected with a reason, never aggregated.

A stock Flower strategy aborts the whole run on one inconsistent reply (measured), so the
coordinator checks every reply here and hands the strategy only clean, uniform messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedseek.wire.transfer import update_wire_bytes

log = logging.getLogger(__name__)


@dataclass
class SiteReply:
    """A reply that passed validation: full local weights plus its metrics."""

    node_id: int
    site: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class Screened:
    """Outcome of screening one round's replies."""

    accepted: list[SiteReply] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"node_id","site","reason"}
    refused: list[dict] = field(default_factory=list)  # privacy-budget refusals {"node_id","site","reason",...}
    failed: list[dict] = field(default_factory=list)  # error replies (crash, timeout)
    bytes_up: int = 0  # exact codec payload bytes of accepted updates
    wire_bytes_up: int = 0  # the update's Flower records: packed blob (payload + codec meta) + framing


def _site_name(content: RecordDict) -> str:
    rec = content.config_records.get("site")
    return str(rec.get("name", "")) if rec is not None else ""


def screen_replies(
    replies: Iterable[Message],
    global_arrays: dict[str, np.ndarray],
    *,
    mask: dict[str, np.ndarray] | None = None,
    max_update_norm: float | None = None,
    max_payload_bytes: int | None = None,
) -> Screened:
    """Sort replies into accepted / rejected (malformed) / refused (privacy budget) / failed (errors).

    An accepted reply's update is decoded (fedseek.wire.codec, validated against the global
    model's shapes) and turned into full weights: global + delta.
    """
    out = Screened()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            reason = f"error reply (code {msg.error.code}): {str(msg.error.reason)[:300]}"
            # reply_to: the coordinator maps it to the node the message went to (Flower's own error replies
            # for an unavailable node come from the SuperLink's node id, not from the node)
            out.failed.append({"node_id": node, "site": "", "reason": reason, "reply_to": msg.metadata.reply_to_message_id})
            log.warning("node %s: %s", node, reason)
            continue
        content = msg.content
        site = _site_name(content)
        status = content.config_records.get("status")
        if status is not None and status.get("refused"):
            metrics = dict(content.metric_records.get("metrics", MetricRecord()))
            out.refused.append({"node_id": node, "site": site, "reason": str(status.get("refused")), **metrics})
            log.warning("site %s (node %s) refused the round: %s", site, node, status.get("refused"))
            continue
        reason, reply = _check_one(content, global_arrays, mask, max_update_norm, max_payload_bytes)
        if reply is None:
            out.rejected.append({"node_id": node, "site": site, "reason": reason})
            log.warning("rejected update from site %s (node %s): %s", site, node, reason)
            continue
        reply.node_id, reply.site = node, site
        out.bytes_up += int(reply.metrics.get("payload-bytes", 0))
        out.wire_bytes_up += update_wire_bytes(content)
        out.accepted.append(reply)
    return out


def _check_one(
    content: RecordDict,
    global_arrays: dict[str, np.ndarray],
    mask: dict[str, np.ndarray] | None,
    max_update_norm: float | None,
    max_payload_bytes: int | None = None,
) -> tuple[str, SiteReply | None]:
    from fedseek.wire.codec import CodecError
    from fedseek.wire.transfer import unpack_update

    if "update" not in content.array_records or "update-codec" not in content.config_records:
        return "no 'update' / 'update-codec' record in reply", None
    if "metrics" not in content.metric_records:
        return "no 'metrics' record in reply", None
    metrics = content.metric_records["metrics"]
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not n > 0:
        return f"metric 'num-examples' missing or not positive ({n!r})", None
    shapes = {k: tuple(v.shape) for k, v in global_arrays.items()}
    size = update_wire_bytes(content)
    if max_payload_bytes is not None and size > max_payload_bytes:
        return f"oversize payload: {size} bytes > limit {max_payload_bytes}", None
    try:
        delta, payload = unpack_update(content, shapes, mask)
    except (CodecError, KeyError, ValueError, TypeError) as exc:
        return f"undecodable update ({type(exc).__name__}: {str(exc)[:200]})", None
    missing = sorted(set(shapes) - set(delta))
    if missing:
        return f"update lacks tensors {missing[:3]}", None
    for k, d in delta.items():
        if d.shape != shapes[k]:
            return f"wrong shape for {k}: {d.shape} != {shapes[k]}", None
        if not np.all(np.isfinite(d)):
            return f"non-finite values (NaN/Inf) in {k}", None
    norm = float(np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values())))
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.3g} above bound {max_update_norm:g}", None
    arrays = {k: (global_arrays[k] + delta[k]).astype(np.float32) for k in shapes}
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scalars["payload-bytes"] = float(payload)
    scalars["update-norm"] = norm
    return "", SiteReply(0, "", arrays, int(n), scalars)


def as_messages(accepted: list[SiteReply]) -> list[Message]:
    """Uniform messages (one ArrayRecord, one MetricRecord with num-examples) for Flower's strategies."""
    msgs = []
    for r in accepted:
        content = RecordDict(
            {
                "arrays": ArrayRecord(_to_record(r.arrays)),
                "metrics": MetricRecord({"num-examples": r.num_examples, "train-loss": r.metrics.get("train-loss", 0.0)}),
            }
        )
        msgs.append(Message(content=content, dst_node_id=0, message_type="train"))
    return msgs


def _to_record(arrays: dict[str, np.ndarray]) -> dict:
    from flwr.app import Array

    return {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
