"""The coordinator's running account of a run: traffic and failure totals, each site's privacy view, rejections.

It turns one round's outcome into the typed metrics row, and the whole run into the summary's
totals and privacy section. Sites' epsilons are what their own ledgers reported: the site's
ledger is the authority, this is the coordinator's view of it. Federated evaluations (their
own ledger at each site) are kept apart in `FederatedBook`.
"""

from __future__ import annotations

import time
from typing import Any

from fedseek.config import PrivacySpec, SecureAggregationSpec
from fedseek.outputs.schema import (
    FederatedEvalRow,
    FederatedEvalSummary,
    MetricsRow,
    PrivacySummary,
    Rejection,
    RoundRejection,
    SiteEvalSummary,
    SiteIssue,
    SitePrivacy,
    SiteRoundView,
    WatermarkRound,
)
from fedseek.runtime.nodes import NodeTracker
from fedseek.runtime.strategy import RoundOutcome
from fedseek.wire.records import RefusalMetrics
from fedseek.wire.screening import Issue, Screened

_TOTALS = ("bytes_up", "wire_bytes_up", "bytes_down", "dense_bytes_up", "rejected", "refused", "failed")


def _site_views(screened: Screened) -> dict[str, SiteRoundView]:
    views: dict[str, SiteRoundView] = {}
    for r in screened.accepted:
        m = r.metrics
        views[r.site or str(r.node_id)] = SiteRoundView(
            status="trained", epsilon=m.epsilon, delta=m.delta, noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate,
            dp_steps=m.dp_steps, dp_steps_total=m.dp_steps_total, train_loss=m.train_loss, num_examples=m.num_examples,
            local_epsilon=m.local_epsilon)
    for f in screened.refused:
        rm = f.refusal or RefusalMetrics()
        views[f.site or str(f.node_id)] = SiteRoundView(
            status="refused", epsilon=rm.epsilon, delta=rm.delta, epsilon_budget=rm.epsilon_budget, projected_epsilon=rm.projected_epsilon)
    return views


def _train_loss(screened: Screened) -> float | None:
    """Example-weighted mean of the training losses sites reported (DP sites report none: it is not a DP release)."""
    known = [(r.metrics.train_loss, r.aggregation_weight) for r in screened.accepted if r.metrics.train_loss is not None]
    weight = sum(n for _, n in known)
    return sum(loss * n for loss, n in known) / weight if weight else None


def _issues(issues: list[Issue]) -> list[SiteIssue]:
    return [SiteIssue(site=i.site, reason=i.reason) for i in issues]


class FederatedBook:
    """Each site's federated evaluations (its evaluation ledger's epsilon as reported) and the last pooled row."""

    def __init__(self) -> None:
        self.sites: dict[str, SiteEvalSummary] = {}
        self.rounds: list[int] = []
        self.last: FederatedEvalRow | None = None

    def record(self, row: FederatedEvalRow) -> None:
        """Account for one evaluation: counts per outcome, last epsilon reported, refusing sites excluded from later ones."""
        self.rounds.append(row.round)
        self.last = row
        counters = {"evaluated": "evaluations", "refused": "refusals", "rejected": "rejections", "failed": "failures"}
        for name, view in row.sites.items():
            site = self.sites.setdefault(name, SiteEvalSummary())
            if view.status in counters:
                setattr(site, counters[view.status], getattr(site, counters[view.status]) + 1)
            for key in ("epsilon", "delta", "epsilon_budget"):
                if getattr(view, key) is not None:
                    setattr(site, key, getattr(view, key))
            if view.status == "evaluated":
                site.last_accuracy = view.accuracy
            if view.status == "refused":
                site.excluded = view.reason
            site.last_round, site.last_status = row.round, view.status

    def excluded(self) -> dict[str, str]:
        """Sites that refused an evaluation (budget spent, no held-out split): not asked again."""
        return {name: s.excluded for name, s in self.sites.items() if s.excluded}

    def summary(self, every: int) -> FederatedEvalSummary | None:
        """summary.json's federated_evaluation (None when evaluation was off)."""
        if every <= 0:
            return None
        eps = [s.epsilon for s in self.sites.values() if s.epsilon is not None]
        return FederatedEvalSummary(every=every, rounds=list(self.rounds), last=self.last, max_epsilon=max(eps) if eps else None,
                                    sites=dict(sorted(self.sites.items())))

    def state_dict(self) -> dict[str, Any]:
        """Per-site evaluation views, evaluation rounds and the last row (plain data)."""
        return {"sites": {k: v.model_dump() for k, v in self.sites.items()}, "rounds": list(self.rounds),
                "last": self.last.model_dump() if self.last is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.sites = {k: SiteEvalSummary.model_validate(v) for k, v in state["sites"].items()}
        self.rounds = list(state["rounds"])
        self.last = FederatedEvalRow.model_validate(state["last"]) if state["last"] is not None else None


class RunBook:
    """Totals, per-site views and rejections across rounds; checkpointed with state_dict()."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(_TOTALS, 0)
        self.sites: dict[str, dict[str, Any]] = {}  # site name -> latest privacy / participation view
        self.rejections: list[RoundRejection] = []
        self.federated = FederatedBook()

    def record_round(self, rnd: int, outcome: RoundOutcome, nodes: NodeTracker, *, started: float, central: dict[str, float], codec: str,
                     sparsity: float, watermark: WatermarkRound | None, federated: FederatedEvalRow | None = None) -> MetricsRow:
        """Account for one round (and the federated evaluation after it, if any) and return its metrics row.

        Replies rejected as impersonation count as rejections of their sender (never of the site
        they named); nodes silent to the QUERY count as timed out, sites backing off as skipped.
        """
        s, seen = outcome.screened, nodes.round
        views = _site_views(s)
        self._update_sites(rnd, views)
        rejections = [Rejection(node_id=r.node_id, site=r.site, reason=r.reason) for r in [*s.rejected, *seen.impersonations]]
        timed_out_sites = [nodes.name(n) for n in [*seen.silent, *outcome.timed_out]]
        timed_out = outcome.timeouts + len(seen.silent)
        t = self.totals
        t["bytes_up"] += s.bytes_up
        t["wire_bytes_up"] += s.wire_bytes_up
        t["dense_bytes_up"] += sum(r.metrics.dense_bytes for r in s.accepted)
        t["bytes_down"] += outcome.bytes_down
        t["rejected"] += len(rejections)
        t["refused"] += len(s.refused)
        t["failed"] += len(s.failed) + timed_out
        self.rejections += [RoundRejection(round=rnd, **r.model_dump()) for r in rejections]
        if federated is not None:
            self.federated.record(federated)
        now = time.time()
        return MetricsRow(
            round=rnd, time=now, round_seconds=now - started, sampled=len(outcome.sampled) + len(seen.silent), accepted=len(s.accepted),
            rejected=len(rejections), refused=len(s.refused), failed=len(s.failed), timed_out=timed_out,
            timed_out_sites=timed_out_sites, skipped_sites=list(seen.skipped), failures=_issues(s.failed), rejections=rejections,
            refusals=_issues(s.refused), bounded=_issues(outcome.bounded), model_kept=outcome.model_kept,
            train_loss=_train_loss(s), central=dict(central), bytes_up=s.bytes_up,
            wire_bytes_up=s.wire_bytes_up, bytes_down=outcome.bytes_down, codec=codec, sparsity=sparsity, watermark=watermark,
            sites=views, federated=federated)

    def _update_sites(self, rnd: int, views: dict[str, SiteRoundView]) -> None:
        for name, view in views.items():
            site = self.sites.setdefault(name, {"rounds_trained": 0, "refusals": 0})
            if view.status == "trained":
                site["rounds_trained"] += 1
            else:
                site["refusals"] += 1
            site.update(view.model_dump(exclude_none=True, exclude={"status"}))
            site["last_round"] = rnd

    def privacy_summary(self, privacy: PrivacySpec | None, secure: SecureAggregationSpec | None = None) -> PrivacySummary:
        """The summary's privacy section: policy, each site's last reported spend, the worst epsilon (and, when the rounds
        were secure sums, the coordinator's min_sites and colluders and the worst local floor the sites reported)."""
        sites = {
            name: SitePrivacy(epsilon=s.get("epsilon"), delta=s.get("delta"), steps=s.get("dp_steps_total"),
                              noise_multiplier=s.get("noise_multiplier"), sample_rate=s.get("sample_rate"),
                              rounds_trained=s["rounds_trained"], refusals=s["refusals"], local_epsilon=s.get("local_epsilon"))
            for name, s in sorted(self.sites.items())
        }
        eps = [v.epsilon for v in sites.values() if v.epsilon is not None]
        floors = [v.local_epsilon for v in sites.values() if v.local_epsilon is not None]
        distributed = secure is not None and secure.enabled
        return PrivacySummary(
            enabled=bool(privacy and privacy.enabled), accountant=privacy.accountant if privacy else None,
            delta=privacy.delta if privacy else None, epsilon_budget=privacy.epsilon_budget if privacy else None,
            max_epsilon=max(eps) if eps else None, sites=sites, mode="distributed" if distributed else "local",
            min_sites=secure.min_sites if secure is not None and distributed else None,
            colluders=secure.colluders if secure is not None and distributed else None,
            max_local_epsilon=max(floors) if floors else None)

    def state_dict(self) -> dict[str, Any]:
        """Totals, site views and rejections (plain data)."""
        return {"totals": dict(self.totals), "sites": self.sites, "rejections": [r.model_dump() for r in self.rejections],
                "federated": self.federated.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.totals.update(state["totals"])
        self.sites = state["sites"]
        self.rejections = [RoundRejection.model_validate(r) for r in state["rejections"]]
        if state.get("federated") is not None:  # checkpoints written before federated evaluation lack it
            self.federated.load_state_dict(state["federated"])
