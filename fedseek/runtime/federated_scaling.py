"""`scaling: federated` at the coordinator: the sites' scaling statistics, computed together before round 1.

The coordinator asks every connected site (a "query.stats" message) for per-column sums and
sums of squares of its raw training values (`fedseek.runtime.site_stats`): exact without DP,
or, under DP, sums of values clipped into public bounds, centred and divided by the half-range,
with Gaussian noise, charged to each site's training ledger. It validates every reply (a
malformed or impossible one is rejected and audited, never pooled), pools them into one mean and
standard deviation per column, and sends those with every round (`RoundConfig.scaling`); the
central test set and the model card use the same values. Pooling: with N = sum of the sites'
record counts, mean = sum(S1) / N and var = sum(S2) / N - mean^2, in raw units (a DP reply is
mapped back: S1 = n*mid + r*Z1, S2 = n*mid^2 + 2*mid*r*Z1 + r^2*Z2). A mean is clipped into its
bounds; a standard deviation below a quarter of the half-range (noise can make the variance tiny or negative)
is raised to it under DP, and a constant column (exact variance 0) keeps std 1 (only centred).
The noise std of each mean, first order, is r * s * sqrt(sum of DP sites) / N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import Message, RecordDict

from fedseek.data.preprocess import numeric_features
from fedseek.outputs.schema import ScalingSummary
from fedseek.runtime.exchange import send_and_receive
from fedseek.runtime.log import flwr_log
from fedseek.wire.records import CONFIG, METRICS, FittedScaling, RecordError, StatsReply, StatsRequest, refusal_reason

if TYPE_CHECKING:
    from fedseek.runtime.nodes import NodeTracker
    from fedseek.runtime.task import Task

MESSAGE_TYPE = "query.stats"
Z_MAX = 10.0  # a noisy sum this many noise stds outside its possible range is not noise: rejected
STD_FLOOR = 0.25  # under DP, a std is at least this fraction of the column's half-range (noise can make a variance tiny)


@dataclass
class Request:
    """What the coordinator asks for: numeric feature columns, the regression target (if any) and their public bounds."""

    columns: list[str]
    target: str | None
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every column statistics come back for, in reply order (target last)."""
        return [*self.columns, *([self.target] if self.target is not None else [])]


def scaling_request(task: Task) -> Request | None:
    """The statistics a task needs (None when its scaling is not federated)."""
    spec = task.preprocess
    if spec is None or spec.scaling != "federated" or task.schema is None or not task.schema.features:
        return None
    target = task.label_column if task.task_type == "regression" else None
    columns = [c for c in numeric_features(list(task.schema.features), spec) if c not in spec.categorical]
    return Request(columns, target, dict(spec.bounds))


def check_stats(m: StatsReply, req: Request) -> str:
    """Why a reply cannot be a site's statistics for `req` ("" when it can)."""
    k = len(req.names)
    if len(m.sums) != k:
        return f"statistics for {len(m.sums)} columns, {k} were asked for"
    n, slack = m.num_examples, (Z_MAX * m.noise_std if m.noise_std > 0 else 1e-6)
    if m.normalized:
        if any(req.bounds.get(c) is None for c in req.names):
            return "a normalised (DP) reply for columns without bounds"
        for j, (s1, s2) in enumerate(zip(m.sums, m.squares, strict=True)):
            if not (-n - slack <= s1 <= n + slack and -slack <= s2 <= n + slack):
                return f"column {req.names[j]!r}: sums {s1:.6g} / {s2:.6g} outside [-{n}, {n}] / [0, {n}] beyond the noise"
        return ""
    if m.noise_std > 0:
        return "noise without the normalised (DP) form"
    for j, (s1, s2) in enumerate(zip(m.sums, m.squares, strict=True)):
        if s2 < -1e-9 or s1 * s1 > n * s2 * (1 + 1e-9) + 1e-9:
            return f"column {req.names[j]!r}: sum {s1:.6g} and sum of squares {s2:.6g} are impossible for {n} values"
    return ""


def _raw(m: StatsReply, req: Request, j: int) -> tuple[float, float]:
    """Column j's sums in raw units (a DP reply mapped back from its normalised form)."""
    if not m.normalized:
        return m.sums[j], m.squares[j]
    lo, hi = req.bounds[req.names[j]]
    mid, r = (lo + hi) / 2.0, (hi - lo) / 2.0
    n = m.num_examples
    return n * mid + r * m.sums[j], n * mid * mid + 2 * mid * r * m.sums[j] + r * r * m.squares[j]


def pool(answers: list[StatsReply], req: Request) -> tuple[FittedScaling, dict[str, float]]:
    """One mean and std per column from the sites' sums, and each mean's noise std (0 for exact replies); see the module doc."""
    total = sum(m.num_examples for m in answers)
    noisy = any(m.noise_std > 0 for m in answers)
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    mean_noise: dict[str, float] = {}
    for j, name in enumerate(req.names):
        sums = [_raw(m, req, j) for m in answers]
        mu = sum(s for s, _ in sums) / total
        var = sum(q for _, q in sums) / total - mu * mu
        bounds = req.bounds.get(name)
        if bounds is not None:
            mu = min(max(mu, bounds[0]), bounds[1])
        if noisy and bounds is not None:
            r = (bounds[1] - bounds[0]) / 2.0
            sd = math.sqrt(max(var, (STD_FLOOR * r) ** 2))
            mean_noise[name] = r * math.sqrt(sum(m.noise_std**2 for m in answers)) / total
        else:
            sd = math.sqrt(var) if var > 1e-12 * max(1.0, mu * mu) else 1.0
            mean_noise[name] = 0.0
        mean[name], std[name] = float(mu), float(sd)
    return FittedScaling(mean=mean, std=std), mean_noise


class ScalingFitter:
    """Asks the sites for their statistics, validates and pools the replies; a checkpoint part (fitted values survive a resume)."""

    def __init__(self, request: Request, *, run_id: str, timeout_s: float, data_schema: Any = None) -> None:
        self.request, self.run_id, self.timeout_s, self.data_schema = request, run_id, timeout_s, data_schema
        self.fitted: FittedScaling | None = None
        self.summary: ScalingSummary | None = None

    def fit(self, grid: Any, nodes: NodeTracker, audit: Any) -> FittedScaling | None:
        """One round of statistics (before round 1); the fitted scaling, or None when no site gave usable statistics."""
        targets = nodes.alive(1, 0)
        req = StatsRequest(run_id=self.run_id, columns=self.request.columns, target=self.request.target,
                           bounds=self.request.bounds, data_schema=self.data_schema)
        content = RecordDict({CONFIG: req.to_record()})
        msgs = [Message(content=content, dst_node_id=n, message_type=MESSAGE_TYPE) for n in targets]
        replies = send_and_receive(grid, msgs, timeout=self.timeout_s) if msgs else []
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs if m.metadata.message_id}
        answers: dict[str, StatsReply] = {}
        outcomes: dict[str, str] = {}
        for reply in replies:
            node = dst.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            site = nodes.name(node)
            status, metrics = self._outcome(nodes, node, reply)
            outcomes[site] = status
            if metrics is not None:
                answers[site] = metrics
            else:
                audit("scaling_statistics_" + status.split(":")[0], site=site, reason=status)
        for n in targets:
            outcomes.setdefault(nodes.name(n), "timed_out")
        if not answers:
            flwr_log("scaling statistics: no site gave usable statistics (%s)", ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
            return None
        ordered = [answers[k] for k in sorted(answers)]
        self.fitted, noise = pool(ordered, self.request)
        eps = [m.epsilon for m in ordered if m.epsilon is not None]
        self.summary = ScalingSummary(columns=self.request.names, mean=self.fitted.mean, std=self.fitted.std, mean_noise_std=noise,
                                      sites=len(ordered), num_examples=sum(m.num_examples for m in ordered),
                                      dp=any(m.normalized for m in ordered), max_epsilon=max(eps) if eps else None,
                                      outcomes=dict(sorted(outcomes.items())))
        flwr_log("scaling statistics from %d of %d sites (%d records%s)", len(ordered), len(targets), self.summary.num_examples,
                 ", DP-noised" if self.summary.dp else "")
        audit("scaling_fitted", sites=len(ordered), dp=self.summary.dp)
        return self.fitted

    def _outcome(self, nodes: NodeTracker, node: int, reply: Message) -> tuple[str, StatsReply | None]:
        problem = nodes.check_claim(node, reply, "query")
        if problem:
            return f"rejected: {problem}", None
        if reply.has_error():
            return f"failed: error reply (code {reply.error.code}): {str(reply.error.reason)[:200]}", None
        refused = refusal_reason(reply.content)
        if refused is not None:
            return f"refused: {refused}", None
        if METRICS not in reply.content.metric_records:
            return "rejected: no 'metrics' record in the statistics reply", None
        try:
            m = StatsReply.from_record(reply.content.metric_records[METRICS])
        except RecordError as exc:
            return f"rejected: {str(exc)[:300]}", None
        why = check_stats(m, self.request)
        return (f"rejected: {why}", None) if why else ("answered", m)

    def state_dict(self) -> dict[str, Any]:
        """The fitted statistics and their summary."""
        return {"fitted": self.fitted.model_dump() if self.fitted else None,
                "summary": self.summary.model_dump() if self.summary else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint."""
        self.fitted = FittedScaling.model_validate(state["fitted"]) if state.get("fitted") else None
        self.summary = ScalingSummary.model_validate(state["summary"]) if state.get("summary") else None
