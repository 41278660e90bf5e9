"""The report's federated evaluation section: pooled estimates per evaluation round and each site's answers and spend.

Rows come from metrics.jsonl (`MetricsRow.federated`); each site's evaluation epsilon from
summary.json's `federated_evaluation` when the run finished, else from the last rows. Cells
are plain text (the template escapes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedseek.outputs.report_data import RunData
from fedseek.outputs.report_format import Table, clean, fmt, num
from fedseek.outputs.schema import FederatedEvalRow, SiteEval, SiteEvalSummary

ROUND_HEADERS = ["after round", "accuracy ± std", "balanced accuracy ± std", "loss ± std", "sites evaluated / asked", "refused",
                 "rejected", "failed / timed out", "pooled count", "held-out size"]
HOW = ("Each site evaluates the global model on a held-out split it never trains on and releases only counts (per class: examples "
       "and correct predictions) and a clipped loss sum; the coordinator pools them. A site that refused is not asked again.")
SITE_HEADERS = ["site", "accuracy ± std (last)", "noisy count", "noise std", "evaluation epsilon", "eval. budget", "evaluations",
                "refusals", "rejected / failed", "last status / reason"]


@dataclass(frozen=True)
class FederatedSection:
    """Pooled federated accuracy per evaluation round, the per-site table, and whether the values are DP-noised."""

    rounds: Table | None  # None: metrics.jsonl holds no evaluation round
    sites: Table | None
    noisy: bool
    notes: list[str] = field(default_factory=list)


def pm(value: Any, std: Any, digits: int = 4) -> str:
    """'value ± std' ('—' when there is no value)."""
    if num(value) is None:
        return "—"
    return f"{fmt(value, digits)} ± {fmt(std, digits)}" if num(std) is not None else fmt(value, digits)


def _round_cells(f: FederatedEvalRow) -> list[str]:
    return [fmt(f.round), pm(f.accuracy, f.accuracy_std), pm(f.balanced_accuracy, f.balanced_accuracy_std), pm(f.loss, f.loss_std),
            f"{fmt(f.evaluated)} / {fmt(f.sampled)}", fmt(f.refused), fmt(f.rejected), f"{fmt(f.failed)} / {fmt(f.timed_out)}",
            fmt(f.count, 1), fmt(f.num_examples)]


@dataclass
class _SiteSeen:
    """A site across evaluation rows: its last answer, its last outcome and its counts (a stand-in for the summary)."""

    answer: SiteEval | None = None
    last: SiteEval | None = None
    last_round: int = 0
    totals: SiteEvalSummary = field(default_factory=SiteEvalSummary)


def _seen(evals: list[FederatedEvalRow]) -> dict[str, _SiteSeen]:
    seen: dict[str, _SiteSeen] = {}
    counters = {"evaluated": "evaluations", "refused": "refusals", "rejected": "rejections", "failed": "failures"}
    for f in evals:
        for name, view in f.sites.items():
            s = seen.setdefault(name, _SiteSeen())
            s.last, s.last_round = view, f.round
            if view.status == "evaluated":
                s.answer = view
            if view.status in counters:
                setattr(s.totals, counters[view.status], getattr(s.totals, counters[view.status]) + 1)
            if view.epsilon is not None:
                s.totals.epsilon, s.totals.epsilon_budget = view.epsilon, view.epsilon_budget
    return seen


def _site_cells(name: str, seen: _SiteSeen, summary: SiteEvalSummary | None) -> list[str]:
    t = summary if summary is not None else seen.totals
    a = seen.answer
    status = ""
    if seen.last is not None:
        status = f"{seen.last.status.replace('_', ' ')} (round {seen.last_round})"
        if seen.last.reason:
            status += f": {clean(seen.last.reason, 200)}"
    return [clean(name, 80), pm(a.accuracy, a.accuracy_std) if a else "—", fmt(a.count, 1) if a else "—",
            fmt(a.noise_std, 3) if a else "—", fmt(t.epsilon), fmt(t.epsilon_budget, 3), fmt(t.evaluations), fmt(t.refusals),
            f"{fmt(t.rejections)} / {fmt(t.failures)}", status]


def last_federated(data: RunData) -> FederatedEvalRow | None:
    """The run's last federated evaluation: summary.json's, else the last one metrics.jsonl holds."""
    fed = data.summary.federated_evaluation if data.summary is not None else None
    if fed is not None and fed.last is not None:
        return fed.last
    return next((r.federated for r in reversed(data.rows) if r.federated is not None), None)


def federated_section(data: RunData) -> FederatedSection | None:
    """The section, or None when the run had no federated evaluation."""
    evals = [r.federated for r in data.rows if r.federated is not None]
    fed_summary = data.summary.federated_evaluation if data.summary is not None else None
    if not evals and fed_summary is None:
        return None
    seen = _seen(evals)
    per = fed_summary.sites if fed_summary is not None else {}
    sites = [_site_cells(n, seen.get(n) or _SiteSeen(), per.get(n)) for n in sorted(set(seen) | set(per))]
    noisy = any(f.noisy for f in evals)
    notes = [HOW]
    if noisy:
        notes.insert(0, "These values are DP-noised estimates: sites added Gaussian noise (the noise std column) to every count they "
                        "released, charged to a separate evaluation ledger (the evaluation epsilon column). ± is the propagated noise "
                        "std (first-order delta method), not sampling error; estimates are clipped to their valid range.")
    elif evals:
        notes.insert(0, "Exact counts: no site added noise to its evaluation (noise std 0), so ± is 0.")
    if fed_summary is not None and not evals:
        notes.append("metrics.jsonl holds no evaluation round; the site table is summary.json's.")
    return FederatedSection(rounds=Table(ROUND_HEADERS, [_round_cells(f) for f in evals], "rounds") if evals else None,
                            sites=Table(SITE_HEADERS, sites, "sites") if sites else None, noisy=noisy, notes=notes)
