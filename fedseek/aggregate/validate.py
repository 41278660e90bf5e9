"""Validation of site replies before aggregation: a bad reply is rejected with a reason, never aggregated.

A stock Flower strategy aborts the whole run on one inconsistent reply (measured), so the
coordinator checks every reply here and hands the strategy only clean, uniform messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

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
    bytes_up: int = 0


def _site_name(content: RecordDict) -> str:
    rec = content.config_records.get("site")
    return str(rec.get("name", "")) if rec is not None else ""


def screen_replies(
    replies: Iterable[Message],
    template: dict[str, np.ndarray],
    *,
    max_update_norm: float | None = None,
    global_arrays: dict[str, np.ndarray] | None = None,
) -> Screened:
    """Sort replies into accepted / rejected (malformed) / refused (privacy budget) / failed (errors)."""
    out = Screened()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            reason = f"error reply (code {msg.error.code}): {str(msg.error.reason)[:300]}"
            out.failed.append({"node_id": node, "site": "", "reason": reason})
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
        reason, reply = _check_one(content, template, max_update_norm, global_arrays)
        if reply is None:
            out.rejected.append({"node_id": node, "site": site, "reason": reason})
            log.warning("rejected update from site %s (node %s): %s", site, node, reason)
            continue
        reply.node_id, reply.site = node, site
        out.bytes_up += int(content.array_records["arrays"].count_bytes())
        out.accepted.append(reply)
    return out


def _check_one(
    content: RecordDict,
    template: dict[str, np.ndarray],
    max_update_norm: float | None,
    global_arrays: dict[str, np.ndarray] | None,
) -> tuple[str, SiteReply | None]:
    if "arrays" not in content.array_records:
        return "no 'arrays' record in reply", None
    if "metrics" not in content.metric_records:
        return "no 'metrics' record in reply", None
    metrics = content.metric_records["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or n <= 0:
        return f"metric 'num-examples' missing or not positive ({n!r})", None
    try:
        arrays = {k: v.numpy() for k, v in content.array_records["arrays"].items()}
    except Exception as exc:  # noqa: BLE001 - a corrupt payload from a site is a rejection, not a crash
        return f"undecodable arrays ({type(exc).__name__}: {exc})", None
    missing = sorted(set(template) - set(arrays))
    extra = sorted(set(arrays) - set(template))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})", None
    for k, ref in template.items():
        a = arrays[k]
        if a.shape != ref.shape:
            return f"wrong shape for {k}: {a.shape} != {ref.shape}", None
        if a.dtype != ref.dtype:
            return f"wrong dtype for {k}: {a.dtype} != {ref.dtype}", None
        if not np.all(np.isfinite(a)):
            return f"non-finite values (NaN/Inf) in {k}", None
    if max_update_norm is not None and global_arrays is not None:
        sq = sum(float(np.sum((arrays[k].astype(np.float64) - global_arrays[k]) ** 2)) for k in template)
        norm = sq**0.5
        if norm > max_update_norm:
            return f"update norm {norm:.3g} above bound {max_update_norm:g}", None
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
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
