"""Federated evaluation at the coordinator: the global model on the sites' held-out splits, released as counts and pooled.

Each site that is not excluded gets an EVALUATE message (the packed global model and an
`EvalConfig`) and answers with per-class counts, per-class correct counts and a clipped loss
sum (`EvalMetrics`), Gaussian-noised under DP, or with a refusal. Every reply is validated
(a malformed one is rejected with a reason, never pooled, never crashes the run); sites are
named by the node the message went to (NodeTracker), never by what a reply claims.

Pooling sums the released counts over sites: accuracy = sum(correct) / sum(counts); balanced
accuracy = mean over classes of sum_k correct / sum_k counts (classes whose pooled count is
<= 0 are skipped); loss = sum(loss sums) / sum(counts). Each estimate is clipped into its valid
range and reported with its noise std by the first-order delta method: for a ratio R/N of
independent noisy sums, std ~= sqrt(Var R + (R/N)^2 Var N) / N, where a site with noise std s
and K classes adds K s^2 to Var of the summed counts (and of the summed correct counts), s^2 per
class to a class's sums, and (s * loss_clip)^2 to the loss sum. The approximation holds when
the pooled count is large against its noise; it ignores the clipping and the skipped classes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedseek.outputs.schema import FederatedEvalRow, SiteEval
from fedseek.runtime.exchange import send_and_receive
from fedseek.runtime.log import flwr_log
from fedseek.runtime.nodes import Audit, NodeTracker
from fedseek.wire.data_schema import DataSchema
from fedseek.wire.records import (
    CONFIG,
    METRICS,
    EvalConfig,
    EvalMetrics,
    FittedScaling,
    ModelMeta,
    RecordError,
    RefusalMetrics,
    refusal_reason,
)
from fedseek.wire.transfer import pack_global

if TYPE_CHECKING:
    from fedseek.runtime.global_model import GlobalModel

Z_MAX = 10.0  # a noisy value this many noise stds outside its possible range is not noise (p < 1e-23): rejected
EXACT_TOL = 1e-6  # slack for exact (noise-free) counts written as floats


def due(rnd: int, every: int, last_round: int) -> bool:
    """Whether a federated evaluation follows round `rnd`: every `every` rounds and after the last (once); never when every is 0."""
    return every > 0 and (rnd % every == 0 or rnd == last_round)


# ---------------------------------------------------------------------------- validation
def _target_problem(m: EvalMetrics) -> str:
    """Why a regression site's four normalised sums cannot come from its held-out records ("" when they can)."""
    n, slack = m.num_examples, (Z_MAX * m.noise_std if m.noise_std > 0 else EXACT_TOL)
    sums = m.target_sums or []
    for k, v in enumerate(sums):
        low = -n - slack if k == 2 else -slack  # the target's sum may be negative; the others are sums of non-negative terms
        if not low <= v <= n + slack:
            return f"target sum {k}: {v:.6g} outside [{-n if k == 2 else 0}, {n}] beyond the noise (std {m.noise_std:g})"
    if len(m.class_counts) != 1 or abs(m.class_counts[0] - n) > 0.5:
        return f"a regression reply's count must be its held-out size {n}"
    return ""


def _range_problem(m: EvalMetrics) -> str:
    """Why released values cannot come from a held-out split of m.num_examples records ("" when they can)."""
    if m.target_sums is not None:
        return _target_problem(m)
    n, s, clip = m.num_examples, m.noise_std, m.loss_clip
    slack = Z_MAX * s if s > 0 else EXACT_TOL
    for k, (c, r) in enumerate(zip(m.class_counts, m.class_correct, strict=True)):
        if not (-slack <= c <= n + slack and -slack <= r <= n + slack):
            return f"class {k}: count {c:.6g} / correct {r:.6g} outside [0, {n}] beyond the noise (std {s:g})"
        if s == 0 and r > c + EXACT_TOL:
            return f"class {k}: exact correct count {r:g} above the class count {c:g}"
    if not -slack * clip <= m.loss_sum <= (n + slack) * clip:
        return f"loss sum {m.loss_sum:.6g} outside [0, {n} x loss clip {clip:g}] beyond the noise"
    if s == 0 and abs(sum(m.class_counts) - n) > 0.5:
        return f"exact class counts sum to {sum(m.class_counts):g}, not the held-out size {n}"
    return ""


def check_reply(content: RecordDict, num_classes: int, regression: bool = False) -> tuple[str, EvalMetrics | None]:
    """One evaluation reply against the contract: ("", metrics) when poolable, (reason, None) otherwise."""
    if METRICS not in content.metric_records:
        return "no 'metrics' record in evaluation reply", None
    try:
        m = EvalMetrics.from_record(content.metric_records[METRICS])
    except RecordError as exc:
        return str(exc)[:300], None
    if len(m.class_counts) != num_classes:
        return f"evaluation metrics carry {len(m.class_counts)} classes, the model has {num_classes}", None
    if regression != (m.target_sums is not None):
        return ("a regression model's evaluation needs target-sums" if regression else "target-sums in a classifier's evaluation"), None
    problem = _range_problem(m)
    return (problem, None) if problem else ("", m)


# ---------------------------------------------------------------------------- pooling
def ratio(num: float, den: float, var_num: float, var_den: float, hi: float = 1.0) -> tuple[float | None, float | None]:
    """num/den clipped to [0, hi] and its delta-method std; (None, None) when the (noisy) denominator is not positive."""
    if den <= 0:
        return None, None
    r = min(max(num / den, 0.0), hi)
    return r, math.sqrt(max(var_num + r * r * var_den, 0.0)) / den


def site_estimate(m: EvalMetrics) -> SiteEval:
    """A site's own accuracy estimate from its released counts, with its noise std."""
    var = len(m.class_counts) * m.noise_std**2
    count = float(sum(m.class_counts))
    acc, std = ratio(float(sum(m.class_correct)), count, var, var)
    return SiteEval(status="evaluated", accuracy=acc, accuracy_std=std, count=count, num_examples=m.num_examples, noise_std=m.noise_std,
                    epsilon=m.epsilon, delta=m.delta, epsilon_budget=m.epsilon_budget)


@dataclass(frozen=True)
class Pooled:
    """The pooled estimates of one federated evaluation (field names as in FederatedEvalRow)."""

    accuracy: float | None = None
    accuracy_std: float | None = None
    balanced_accuracy: float | None = None
    balanced_accuracy_std: float | None = None
    loss: float | None = None
    loss_std: float | None = None
    count: float | None = None
    num_examples: int = 0
    noisy: bool = False
    r2: float | None = None  # regression: 1 - MSE / variance of the pooled targets
    rmse: float | None = None
    mae: float | None = None


def pool_regression(answers: Sequence[EvalMetrics], target_std: float | None) -> Pooled:
    """Regression: the sites' normalised sums back in the model's units (each site's own loss_clip L), pooled, then in the
    target's units (times target_std when the target was standardised). loss = MSE; its noise std sqrt(sum (L s)^2) / N."""
    n = sum(m.num_examples for m in answers)
    if n <= 0:
        return Pooled(num_examples=0)
    scale = target_std if target_std is not None else 1.0
    sse = sum(m.loss_clip * (m.target_sums or [0.0])[0] for m in answers)
    sae = sum(math.sqrt(m.loss_clip) * (m.target_sums or [0.0, 0.0])[1] for m in answers)
    sy = sum(math.sqrt(m.loss_clip) * (m.target_sums or [0.0] * 3)[2] for m in answers)
    syy = sum(m.loss_clip * (m.target_sums or [0.0] * 4)[3] for m in answers)
    mse, mae = max(sse / n, 0.0), max(sae / n, 0.0)
    var = syy / n - (sy / n) ** 2
    loss_std = math.sqrt(sum((m.loss_clip * m.noise_std) ** 2 for m in answers)) / n * scale**2
    return Pooled(loss=mse * scale**2, loss_std=loss_std, count=float(n), num_examples=n, noisy=any(m.noise_std > 0 for m in answers),
                  r2=1.0 - mse / var if var > 0 else None, rmse=math.sqrt(mse) * scale, mae=mae * scale)


def _balanced(answers: Sequence[EvalMetrics]) -> tuple[float | None, float | None]:
    """Mean over classes of pooled correct / pooled count (classes with pooled count <= 0 skipped), and its std."""
    num_classes = len(answers[0].class_counts)
    var = sum(m.noise_std**2 for m in answers)  # per class, summed over sites
    per_class = []
    for k in range(num_classes):
        est = ratio(sum(m.class_correct[k] for m in answers), sum(m.class_counts[k] for m in answers), var, var)
        if est[0] is not None and est[1] is not None:
            per_class.append((est[0], est[1]))
    if not per_class:
        return None, None
    n = len(per_class)
    return sum(a for a, _ in per_class) / n, math.sqrt(sum(s * s for _, s in per_class)) / n


def pool(answers: Sequence[EvalMetrics]) -> Pooled:
    """Sum the sites' released counts and turn them into clipped estimates with their noise stds (see the module doc)."""
    if not answers:
        return Pooled()
    var_counts = sum(len(m.class_counts) * m.noise_std**2 for m in answers)
    count = float(sum(sum(m.class_counts) for m in answers))
    acc, acc_std = ratio(float(sum(sum(m.class_correct) for m in answers)), count, var_counts, var_counts)
    bal, bal_std = _balanced(answers)
    var_loss = sum((m.noise_std * m.loss_clip) ** 2 for m in answers)
    loss, loss_std = ratio(sum(m.loss_sum for m in answers), count, var_loss, var_counts, hi=max(m.loss_clip for m in answers))
    return Pooled(accuracy=acc, accuracy_std=acc_std, balanced_accuracy=bal, balanced_accuracy_std=bal_std, loss=loss, loss_std=loss_std,
                  count=count, num_examples=sum(m.num_examples for m in answers), noisy=any(m.noise_std > 0 for m in answers))


# ---------------------------------------------------------------------------- one evaluation round
def _refusal_view(content: RecordDict, reason: str) -> SiteEval:
    try:
        rm = RefusalMetrics.from_record(content.metric_records.get(METRICS, MetricRecord()))
    except RecordError:
        rm = RefusalMetrics()
    return SiteEval(status="refused", reason=reason, epsilon=rm.epsilon, delta=rm.delta, epsilon_budget=rm.epsilon_budget)


class FederatedEvaluator:
    """Sends EVALUATE messages through the Grid, validates and pools the replies, audits what was not pooled."""

    def __init__(self, grid: Grid, nodes: NodeTracker, audit: Audit, *, meta: ModelMeta, run_id: str, timeout_s: float,
                 downlink: str = "none", data_schema: DataSchema | None = None, target_std: float | None = None) -> None:
        self.grid, self.nodes, self.audit = grid, nodes, audit
        self.meta, self.run_id, self.timeout_s, self.downlink = meta, run_id, timeout_s, downlink
        self.data_schema = data_schema  # announced with every request; a site whose data differs refuses
        self.scaling: FittedScaling | None = None  # scaling: federated: the fitted statistics, sent with every request
        self.target_std = target_std  # regression with a standardised target: pooled errors back in the target's units

    @property
    def regression(self) -> bool:
        """True when the model predicts a number."""
        return self.meta.task == "regression"

    def targets(self, excluded: Collection[str]) -> list[int]:
        """Connected, identified nodes whose site is not excluded nor backing off after time-outs (NodeTracker.targets)."""
        return self.nodes.targets(excluded)

    def messages(self, rnd: int, model: GlobalModel, nodes: list[int]) -> tuple[list[Message], int]:
        """One EVALUATE message per node: the packed global model (as in TRAIN) and the evaluation config; and the bytes sent."""
        records, payload = pack_global(model.released, model.mask, self.downlink)  # what the run releases (the average with ema_decay)
        config = EvalConfig(server_round=rnd, model=self.meta, run_id=self.run_id, data_schema=self.data_schema,
                            scaling=self.scaling).to_record()
        content = RecordDict({**records, CONFIG: config})
        return [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes], payload * len(nodes)

    def evaluate(self, rnd: int, model: GlobalModel, excluded: Collection[str]) -> FederatedEvalRow:
        """Ask every site not excluded to evaluate the current global model; the pooled row (never raises for a bad reply)."""
        t0 = time.time()
        nodes = self.targets(excluded)
        msgs, bytes_down = self.messages(rnd, model, nodes)
        replies = send_and_receive(self.grid, msgs, timeout=self.timeout_s) if msgs else []
        sites, answers = self.collect(msgs, replies)
        pooled = pool_regression(answers, self.target_std) if self.regression else pool(answers)
        statuses = [s.status for s in sites.values()]
        row = FederatedEvalRow(round=rnd, seconds=time.time() - t0, sampled=len(nodes), evaluated=len(answers),
                               refused=statuses.count("refused"), rejected=statuses.count("rejected"), failed=statuses.count("failed"),
                               timed_out=statuses.count("timed_out"), bytes_down=bytes_down, sites=sites, **asdict(pooled))
        self._audit(rnd, row)
        shown = (("R² " + ("n/a" if row.r2 is None else f"{row.r2:.4f}")) if self.regression
                 else "accuracy " + ("n/a" if row.accuracy is None else f"{row.accuracy:.4f} ± {row.accuracy_std or 0.0:.4f}"))
        flwr_log("federated evaluation after round %d: %s (%d of %d sites%s)", rnd, shown, row.evaluated, row.sampled,
                 ", DP-noised" if row.noisy else "")
        return row

    def collect(self, msgs: list[Message], replies: list[Message]) -> tuple[dict[str, SiteEval], list[EvalMetrics]]:
        """Each sampled site's outcome, named by the node its message went to, and the poolable answers (by site name)."""
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs}
        sampled = {int(m.metadata.dst_node_id) for m in msgs}
        named = "" not in dst and len(dst) == len(msgs)  # a Grid that sets no message ids: fall back to the reply's source
        seen: dict[int, SiteEval] = {}
        answers: dict[str, EvalMetrics] = {}
        for r in replies:
            node = dst.get(r.metadata.reply_to_message_id) if named else int(r.metadata.src_node_id)
            if node is None or node not in sampled or node in seen:
                flwr_log("ignoring an evaluation reply that answers no outstanding message (from node %s)", r.metadata.src_node_id)
                continue
            problem = self.nodes.check_claim(node, r, "evaluate")  # a reply naming another site: rejected, audited
            seen[node], metrics = (SiteEval(status="rejected", reason=problem), None) if problem else self._outcome(r)
            if metrics is not None:
                answers[self.nodes.name(node)] = metrics
        for n in sampled - set(seen):
            seen[n] = SiteEval(status="timed_out", reason=f"no reply within round_timeout_s {self.timeout_s:g}s")
        sites = {self.nodes.name(n): v for n, v in seen.items()}
        return dict(sorted(sites.items())), [answers[k] for k in sorted(answers)]

    def _outcome(self, reply: Message) -> tuple[SiteEval, EvalMetrics | None]:
        if reply.has_error():
            return SiteEval(status="failed", reason=f"error reply (code {reply.error.code}): {str(reply.error.reason)[:300]}"), None
        refused = refusal_reason(reply.content)
        if refused is not None:
            return _refusal_view(reply.content, refused), None
        reason, metrics = check_reply(reply.content, self.meta.num_classes, self.regression)
        if metrics is None:
            return SiteEval(status="rejected", reason=reason), None
        return site_estimate(metrics), metrics

    def _audit(self, rnd: int, row: FederatedEvalRow) -> None:
        for name, s in row.sites.items():
            if s.status != "evaluated":
                self.audit(f"evaluation_{s.status}", round=rnd, site=name, reason=s.reason)
