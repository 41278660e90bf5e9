"""fedseek's strategy wrapper: any Flower strategy, with site-name sampling, the packed global model and reply screening.

Flower's serverapp strategies split a round into `configure_train` (who trains on what) and
`aggregate_train` (combine the replies); DP and other concerns are added by wrapping a
strategy (see flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping).
`SiteStrategy` wraps the configured rule (FedAvg, FedProx, FedAdam, FedMedian, Krum, ...):
it samples sites by stable name with the run's seed, sends the global model packed (fp16
downlink, 1-bit mask), screens and decodes every reply, and hands the inner strategy only
clean, uniform messages. The inner strategy keeps its own state (FedAdam's moments) and sees
only its public API: `configure_train` on a view of the Grid listing the sampled sites, then
`aggregate_train`.

One site's influence is bounded (`runtime.influence`: adaptive norm bound, capped weights), and
the aggregate is checked before it becomes the global model: if the inner rule raises or returns
a non-finite, collapsed or exploding model, the round keeps the previous model (and the inner
rule's state), records why, and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseek.config import ValidationSpec
from fedseek.runtime.influence import InfluenceBounds
from fedseek.runtime.nodes import NodeTracker
from fedseek.runtime.secure_round import SecureOutcome
from fedseek.wire.records import site_name
from fedseek.wire.screening import Bounds, Issue, Screened, SiteReply, as_messages, screen_replies
from fedseek.wire.transfer import from_record, pack_global

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What happened to one round's messages: screened replies, time-outs, traffic."""

    sampled: list[int] = field(default_factory=list)
    screened: Screened = field(default_factory=Screened)
    timed_out: list[int] = field(default_factory=list)  # node ids that never answered
    unnamed_timeouts: int = 0  # replies missing from a Grid that sets no message ids (counted, cannot be named)
    bounded: list[Issue] = field(default_factory=list)  # accepted replies whose aggregation weight was bounded
    model_kept: str | None = None  # why the aggregate was discarded and the previous global model kept

    @property
    def timeouts(self) -> int:
        """Every sampled site that sent nothing within the round's timeout."""
        return len(self.timed_out) + self.unnamed_timeouts
    bytes_down: int = 0


class _SampledView:
    """The part of a Grid an inner Flower strategy reads in configure_train: exactly the sampled nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


class SiteStrategy(Strategy):
    """Wraps a Flower strategy with fedseek's sampling, packing and screening (one per run)."""

    def __init__(
        self,
        inner: Strategy,
        nodes: NodeTracker,
        *,
        fraction_train: float,
        min_sites: int,
        seed: int,
        downlink: str = "none",
        max_update_norm: float | None = None,
        max_payload_bytes: int | None = None,
        validation: ValidationSpec | None = None,
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.inner, self.nodes = inner, nodes
        self.fraction_train, self.min_sites, self.downlink = fraction_train, min_sites, downlink
        spec = validation or ValidationSpec()
        self.max_update_norm = max_update_norm if max_update_norm is not None else spec.max_update_norm
        self.max_payload_bytes = max_payload_bytes if max_payload_bytes is not None else spec.max_payload_bytes
        self.influence = InfluenceBounds(spec)
        self.audit = audit if audit is not None else nodes.audit  # the run's audit.jsonl (the tracker writes joins there)
        if spec.norm_bound == "off" and self.max_update_norm is None:
            log.warning("validation: no update-norm bound (norm_bound off, no max_update_norm): one site's update is unbounded")
        self.rng = np.random.default_rng(seed)
        self.excluded: dict[str, str] = {}  # site name -> reason (e.g. privacy budget spent)
        self.mask: dict[str, np.ndarray] | None = None  # the sparsity mask sent with (and enforced on) the model
        self.extra: dict[str, ArrayRecord] = {}  # records sent beside the model every round (distill: the teacher's weights)
        self.outcome = RoundOutcome()
        self._sent: list[Message] = []
        self._global: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ policy
    def sample(self, nodes: list[int]) -> list[int]:
        """Seeded choice over site names (node ids change between runs, names do not); excluded sites skipped."""
        by_name = {self.nodes.name(n): n for n in nodes}
        eligible = sorted(name for name in by_name if name not in self.excluded)
        k = max(1, int(round(len(eligible) * self.fraction_train)))
        if k < len(eligible):
            eligible = sorted(str(x) for x in self.rng.choice(eligible, size=k, replace=False))
        return [by_name[name] for name in eligible]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample sites by name and build their TRAIN messages (packed global model + typed round config)."""
        sampled = self.sample(self.nodes.alive(self.min_sites, server_round))
        self.outcome = RoundOutcome(sampled=sampled)
        self._sent = []
        if not sampled:
            return []
        self._global = from_record(arrays)
        list(self.inner.configure_train(server_round, arrays, config, cast(Grid, _SampledView(sampled))))
        records, payload = pack_global(self._global, self.mask, self.downlink)
        content = RecordDict({**records, **self.extra, "config": config})
        payload += sum(int(r.count_bytes()) for r in self.extra.values())
        self._sent = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
        self.outcome.bytes_down = payload * len(sampled)
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, note refusals and time-outs, and aggregate the accepted ones with the inner strategy."""
        replies = list(replies)
        bounds = Bounds(self._global, self.mask, self.max_update_norm, self.max_payload_bytes)
        screened = screen_replies(self.nodes.verified(replies, self._sent), bounds)  # replies naming another site: rejected
        self.nodes.name_screened(screened)  # each reply named by its sender's identity (registered key / QUERY), never its claim
        self._attribute(replies, screened)
        self.outcome.bounded = self.influence.apply(screened)
        for b in self.outcome.bounded:
            self.audit("update_bounded", round=server_round, site=b.site, node_id=b.node_id, reason=b.reason)
        screened.accepted.sort(key=lambda r: (r.site, r.node_id))  # aggregation order independent of arrival
        for r in screened.refused:
            self.excluded[r.site or f"node-{r.node_id}"] = r.reason
        self.outcome.screened = screened
        if not screened.accepted:
            return None, None
        return self._aggregate(server_round, screened.accepted)

    def aggregate_secure(self, server_round: int, secure: SecureOutcome) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """distributed DP: account for each site's part in the secure round, and apply the unmasked mean as one update.

        The mean is of n_i x delta_i over the K sites in the sum; times K / N (N: their record counts, public) it is the
        example-weighted FedAvg delta. Screening sees only the sum: it must be readable, of the model's shapes, finite,
        within max_update_norm (if set) and pass the aggregate check; otherwise the round keeps the previous model.
        """
        from fedseek.wire.records import METRICS, TrainMetrics

        screened, unreadable, seen = Screened(), [], set()
        for r in secure.collected:
            node = secure.sent_to.get(r.metadata.reply_to_message_id, int(r.metadata.src_node_id))
            seen.add(node)
            site = self.nodes.name(node)
            if r.has_error():
                if node not in secure.malformed:  # (malformed replies are rejected below)
                    self._secure_issue(screened, node, str(r.error.reason), "failed in the secure round")
                continue
            try:
                metrics = TrainMetrics.from_record(r.content.metric_records[METRICS])
            except Exception as exc:  # its masked vector is in the sum all the same: the sum cannot be weighted
                unreadable.append(f"{site}: {type(exc).__name__}")
                continue
            screened.accepted.append(SiteReply(node, site, {}, metrics))
        screened.bytes_up = screened.wire_bytes_up = secure.bytes_up
        screened.accepted.sort(key=lambda r: (r.site, r.node_id))
        out = self.outcome
        out.screened = screened
        out.timed_out = sorted(n for n in out.sampled if secure.stages >= 1 and n not in secure.answered_setup)
        for n, why in sorted(secure.malformed.items()):
            screened.rejected.append(Issue(n, self.nodes.name(n), why))
        for n in out.sampled:
            if n not in seen and n not in out.timed_out and n not in secure.malformed:
                self._secure_issue(screened, n, secure.errors.get(n, ""), "left the secure round before sending its masked update")
        problem = secure.halted if secure.mean is None else ""
        if not problem and unreadable:
            problem = f"replies in the sum have unreadable metrics ({', '.join(unreadable)}): the sum cannot be weighted"
        new: dict[str, np.ndarray] = {}
        if not problem:
            new, problem = self._secure_model(secure.mean or [], screened.accepted, secure.value_range)
        if problem:
            out.model_kept = f"previous global model kept: secure aggregation: {problem}"
            log.warning("round %d: %s", server_round, out.model_kept)
            self.audit("global_model_kept", round=server_round, reason=out.model_kept)
            return None, None
        total = sum(r.num_examples for r in screened.accepted)
        return self._aggregate(server_round, [SiteReply(0, "secure-sum", new, TrainMetrics(num_examples=total))])

    def _secure_issue(self, screened: Screened, node: int, reason: str, failed: str) -> None:
        """A site's error in a secure round: its refusal (excluded from later rounds, as a plain refusal) or a failure."""
        from fedseek.runtime.site_secure import REFUSED

        site = self.nodes.name(node)
        if reason.startswith(REFUSED):
            screened.refused.append(Issue(node, site, reason[len(REFUSED):]))
            self.excluded[site or f"node-{node}"] = reason[len(REFUSED):]
        else:
            screened.failed.append(Issue(node, site, f"{failed}: {reason[:200]}" if reason else failed))

    def _secure_model(self, mean: list[np.ndarray], accepted: list[SiteReply], value_range: float) -> tuple[dict[str, np.ndarray], str]:
        """The global model plus the example-weighted delta the secure mean stands for, or why it cannot be used.

        Every site's values are clipped into SecAgg+'s range, so an honest mean lies within it; a mean outside it means
        a masked vector or a key share was wrong (the masks did not cancel) and the sum is noise.
        """
        keys = list(self._global)
        if len(mean) != len(keys) or any(tuple(m.shape) != tuple(self._global[k].shape) for m, k in zip(mean, keys, strict=False)):
            return {}, "the unmasked sum does not have the model's shapes"
        if value_range > 0:
            outside = sum(int(np.count_nonzero(~(np.abs(m) <= value_range * (1 + 1e-6)))) for m in mean)
            if outside:
                return {}, (f"{outside} values of the unmasked mean lie outside SecAgg+'s range +-{value_range:g}: a site's masked "
                            "vector or key shares were wrong, the masks did not cancel")
        total = sum(r.num_examples for r in accepted)
        if not accepted or total <= 0:
            return {}, "no readable site in the sum"
        scale = len(accepted) / total
        delta = {k: (m * scale).astype(np.float32) for k, m in zip(keys, mean, strict=True)}
        norm = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values())))
        if not np.isfinite(norm):
            return {}, "the unmasked sum is not finite"
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return {}, f"the aggregate update's norm {norm:.4g} exceeds validation.max_update_norm {self.max_update_norm:g}"
        return {k: (self._global[k] + delta[k]).astype(self._global[k].dtype) for k in keys}, ""

    def _aggregate(self, server_round: int, accepted: list[SiteReply]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner rule's aggregate, or (None, None) with the previous model and rule state kept when it raises or is unfit."""
        saved = dict(vars(self.inner))  # Flower's rules replace (never mutate) their state: FedAdam's m_t, v_t
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, as_messages(accepted))
            problem = "the rule returned no model" if arrays is None else self.influence.check_aggregate(from_record(arrays), self._global)
        except Exception as exc:  # a reply that passed screening must not fail the run through the rule either
            arrays, metrics, problem = None, None, f"{type(self.inner).__name__} raised {type(exc).__name__}: {str(exc)[:200]}"
        if not problem:
            return arrays, metrics
        vars(self.inner).clear()
        vars(self.inner).update(saved)
        self.outcome.model_kept = f"previous global model kept: {problem}"
        log.warning("round %d: %s", server_round, self.outcome.model_kept)
        self.audit("global_model_kept", round=server_round, reason=self.outcome.model_kept)
        return None, None

    def _attribute(self, replies: list[Message], screened: Screened) -> None:
        """Name failed and missing replies by the node the message went to (push_messages set each message's id)."""
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent}
        for r in replies:
            try:
                if not r.has_error():
                    self.nodes.names.setdefault(int(r.metadata.src_node_id), site_name(r.content))
            except Exception:  # an unreadable sender was already rejected by screening
                continue
        for f in screened.failed:
            f.node_id = dst.get(f.reply_to, f.node_id)
            f.site = self.nodes.names.get(f.node_id, "")
        if "" in dst or len(dst) != len(self._sent):  # a Grid that sets no message ids: count, cannot name
            self.outcome.unnamed_timeouts = max(0, len(self._sent) - len(replies))
            return
        answered = {r.metadata.reply_to_message_id for r in replies}
        self.outcome.timed_out = sorted(n for mid, n in dst.items() if mid not in answered)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Not used: federated evaluation has its own schedule and privacy rules (runtime.federated_eval)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see configure_evaluate)."""
        return None

    def summary(self) -> None:
        """Flower's hook to log the strategy's settings."""
        self.inner.summary()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Sampling RNG, excluded sites and the inner strategy's server-optimizer state (FedAdam's m_t, v_t; FedAvgM's momentum)."""
        inner: dict[str, np.ndarray] = {}
        for attr in ("m_t", "v_t"):
            val = getattr(self.inner, attr, None)
            if isinstance(val, dict):
                inner.update({f"{attr}/{k}": np.asarray(v) for k, v in val.items()})
        momentum = getattr(self.inner, "momentum_vector", None)  # FedAvgM's server momentum, a list in the model's order
        if isinstance(momentum, list):
            inner.update({f"momentum_vector/{i:05d}": np.asarray(v) for i, v in enumerate(momentum)})
        return {"rng": self.rng.bit_generator.state, "excluded": dict(self.excluded), "inner": inner,
                "influence": self.influence.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.rng.bit_generator.state = state["rng"]
        self.excluded = dict(state["excluded"])
        self.influence.load_state_dict(state.get("influence", {}))  # checkpoints written before the bounds lack it
        for attr in ("m_t", "v_t"):
            vals = {k.split("/", 1)[1]: v for k, v in state["inner"].items() if k.startswith(attr + "/")}
            if vals:
                setattr(self.inner, attr, vals)
        momentum = [v for k, v in sorted(state["inner"].items()) if k.startswith("momentum_vector/")]
        if momentum:
            self.inner.momentum_vector = momentum  # type: ignore[attr-defined]
