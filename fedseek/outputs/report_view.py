"""The report's view model: every card, fact, table and note on the page, as typed, display-ready text.

Totals (bytes, rejected / refused / failed counts, max epsilon, wall time...) are the ones the
coordinator wrote in summary.json; metrics.jsonl gives the per-round and per-site detail, and
stands in for the totals only when there is no usable summary (a run that did not finish).
Cells are plain text: the template escapes them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fedseek.outputs.report_data import RunData, epsilon_tracks
from fedseek.outputs.report_delivery import DeliverySection, delivery_section
from fedseek.outputs.report_federated import FederatedSection, federated_section, last_federated, pm
from fedseek.outputs.report_format import NUMBER, Table, clean, fmt, fmt_bytes, fmt_seconds, num
from fedseek.outputs.report_sites import SitesSection, sites_section
from fedseek.outputs.schema import MetricsRow, dump

MAX_TABLE_ROWS = 500  # rejections / failures / refusals listed before "... and N more"
OPEN_ROUNDS = 30  # the per-round table starts folded above this many rounds


@dataclass(frozen=True)
class PlotSection:
    """One figure's section: title, anchor, caption, and the PNG data URI or why it could not be drawn."""

    title: str
    anchor: str
    caption: str
    uri: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Capped:
    """An event list: empty (`table` None), or a table of at most MAX_TABLE_ROWS and how many more there are."""

    what: str
    table: Table | None
    more: str = ""  # "1,234" when rows were left out


@dataclass(frozen=True)
class Header:
    """The page head: run name, facts line, warnings, notes on unreadable files, and the headline cards."""

    name: str
    facts: list[tuple[str, str]]
    cards: list[tuple[str, str]]
    no_summary: bool
    stop_reason: str
    notes: list[str]
    status: str = ""  # summary.json's status (completed / stopped / failed); "" without a summary
    warnings: list[str] = field(default_factory=list)  # summary.json's warnings (e.g. no better than the majority class)


@dataclass(frozen=True)
class EventsSection:
    """Rejected updates (with a reason histogram when there are many), refused rounds, failed replies."""

    reasons: Table | None
    rejected: Capped
    refused: Capped
    failed: Capped | None  # None: no audit.jsonl reasons; see unexplained_failures
    unexplained_failures: str = ""  # "12" failed or timed-out replies without reasons
    bounded: Capped | None = None  # accepted updates counted with less weight, and rounds whose aggregate was discarded


@dataclass(frozen=True)
class RoundsSection:
    """The per-round table, folded when long."""

    count: int
    table: Table
    open: bool


@dataclass(frozen=True)
class ReportView:
    """Everything report.html shows, in page order."""

    title: str
    run_dir: str
    generated: str
    header: Header
    plots: list[PlotSection]
    has_rounds: bool
    privacy_enabled: bool
    no_watermark: bool
    sites: SitesSection
    events: EventsSection
    rounds: RoundsSection | None
    summary: Table | None
    federated: FederatedSection | None = None  # None: no federated evaluation in this run
    nav: list[tuple[str, str]] = field(default_factory=list)
    delivery: DeliverySection | None = None  # None: not a distillation run


def build_view(data: RunData, plots: list[PlotSection]) -> ReportView:
    """The page for `data`, with its already drawn figures."""
    summary = data.summary
    name = clean((summary.name if summary is not None else "") or data.run_dir.name, 120)
    sites = sites_section(data)
    rounds = rounds_section(data.rows) if data.rows else None
    federated = federated_section(data)
    nav = [(p.anchor, p.title) for p in plots] + [("sites", sites.title)]
    nav += [("federated", "Federated evaluation")] if federated is not None else []
    delivery = delivery_section(data)
    nav += [("delivery", "Teacher and student")] if delivery is not None else []
    nav.append(("events", "Rejected / refused / failed"))
    if rounds is not None:
        nav.append(("rounds", "Per round"))
    nav.append(("summary", "Final summary"))
    return ReportView(
        title=name, run_dir=str(data.run_dir), generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), header=header(data, name),
        plots=plots, has_rounds=bool(data.rows), privacy_enabled=data.privacy.enabled,
        no_watermark=not any(p.anchor == "watermark" for p in plots) and (summary is None or summary.watermark is None),
        sites=sites, events=events_section(data), rounds=rounds, summary=summary_table(data), federated=federated, nav=nav,
        delivery=delivery)


# ---------------------------------------------------------------------------- header
def header(data: RunData, name: str) -> Header:
    """Name, facts, banners and cards."""
    s = data.summary
    facts: list[tuple[str, Any]] = [("run directory", str(data.run_dir))]
    if s is not None:
        facts += [("status", s.status), ("dataset", s.dataset), ("strategy", s.strategy), ("run id", s.run_id), ("seed", s.seed)]
    if data.model:
        arch = ("task", "kind", "hidden" if data.model.get("kind") != "cnn" else "width", "input_shape", "num_classes", "parameters")
        facts.append(("model", ", ".join(f"{k}={clean(data.model[k], 60)}" for k in arch if k in data.model)))
        pre = data.model.get("preprocessing")
        if isinstance(pre, dict) and pre.get("scaling"):
            facts.append(("preprocessing", f"scaling {pre['scaling']}" + (f", one-hot {', '.join(map(str, pre['categorical']))}"
                                                                          if pre.get("categorical") else "")))
    if s is not None and s.selection is not None:
        facts.append(("model.pt", f"round {s.selection.round}: {s.selection.reason}"))
    if s is not None and s.scaling is not None:
        sc = s.scaling
        noise = max(sc.mean_noise_std.values(), default=0.0)
        facts.append(("scaling statistics", f"computed by {sc.sites} sites ({sc.num_examples:,} records) before round 1"
                      + (f", DP-noised (largest noise std of a mean {noise:.4g}; site epsilon after it {fmt(sc.max_epsilon)})"
                         if sc.dp else ", exact") + f"; {len(sc.columns)} columns in summary.json"))
    privacy = data.privacy
    if privacy.enabled:
        p = privacy.summary
        facts.append(("privacy", f"record-level DP-SGD per site, delta {fmt(p.delta, 2)}, accountant {p.accountant or '—'}"))
    return Header(
        name=name, facts=[(k, clean(v, 200)) for k, v in facts if v not in (None, "")], cards=outcome_cards(data) + run_cards(data),
        no_summary=s is None, stop_reason=clean(s.stop_reason) if s is not None and s.stop_reason else "", notes=data.notes,
        status=s.status if s is not None else "", warnings=[clean(w, 300) for w in s.warnings] if s is not None else [])


def outcome_cards(data: RunData) -> list[tuple[str, str]]:
    """Final (and initial) model quality."""
    s = data.summary
    final = (s.final if s is not None else {}) or (data.rows[-1].central if data.rows else {})
    initial = (s.initial if s is not None else None) or {}
    if "r2" in final:  # regression
        cards = [("final R²", fmt(final.get("r2"))), ("RMSE", fmt(final.get("rmse"))), ("MAE", fmt(final.get("mae")))]
        if num(initial.get("r2")) is not None:
            cards.append(("initial R²", fmt(initial.get("r2"))))
        return cards
    cards = [("final accuracy", fmt(final.get("accuracy", s.final_accuracy if s is not None else None)))]
    if "auc" in final:
        cards.append(("final ROC AUC", fmt(final.get("auc"))))
    if "balanced_accuracy" in final:
        cards.append(("balanced accuracy", fmt(final.get("balanced_accuracy"))))
    if num(initial.get("accuracy")) is not None:
        cards.append(("initial accuracy", fmt(initial.get("accuracy"))))
    fed = last_federated(data)
    if fed is not None and num(fed.accuracy) is not None:
        cards.append(("federated accuracy" + (" (DP-noised)" if fed.noisy else ""), pm(fed.accuracy, fed.accuracy_std)))
    return cards


@dataclass(frozen=True)
class _Totals:
    rounds: int | None
    planned: int | None
    sites: int | None
    wall: float | None
    rejected: int | None
    refused: int | None
    failed: int | None
    bytes_up: int | None
    bytes_down: int | None


def _totals(data: RunData) -> _Totals:
    """The summary's totals; summed from the rounds only when there is no summary (a run that did not finish)."""
    s, rows = data.summary, data.rows
    if s is not None:
        return _Totals(s.rounds_completed, s.rounds, s.num_sites, s.wall_seconds, s.rejected_updates, s.refused_rounds,
                       s.failed_replies, s.bytes_up, s.bytes_down)
    if not rows:
        return _Totals(None, None, None, None, None, None, None, None, None)
    return _Totals(len(rows), None, max(r.sampled for r in rows) or None, sum(r.round_seconds for r in rows) or None,
                   sum(r.rejected for r in rows), sum(r.refused for r in rows), sum(r.failed + r.timed_out for r in rows),
                   sum(r.bytes_up for r in rows), sum(r.bytes_down for r in rows))


def _max_epsilon(data: RunData) -> float | None:
    if data.summary is not None:
        return num(data.summary.privacy.max_epsilon)
    tracks, _ = epsilon_tracks(data.rows)
    eps = [e for t in tracks.values() for _, e in t]
    return max(eps) if eps else None


def run_cards(data: RunData) -> list[tuple[str, str]]:
    """Rounds, sites, time, privacy, watermark, failures, traffic, compression, sparsity."""
    s, t, privacy = data.summary, _totals(data), data.privacy
    cards = [("rounds", f"{fmt(t.rounds)} / {fmt(t.planned)}" if t.planned is not None else fmt(t.rounds)),
             ("sites", fmt(t.sites)), ("wall time", fmt_seconds(t.wall))]
    if privacy.enabled:
        b = privacy.budget
        cards.append(("max epsilon / budget", f"{fmt(_max_epsilon(data), 4)} / {f'{b:g}' if b is not None else '—'}"))
    else:
        cards.append(("differential privacy", "off"))
    if s is not None and s.watermark is not None:
        cards.append(("watermark", ("detected" if s.watermark.detected else "NOT detected") + f", p = {fmt(s.watermark.p_value, 3)}"))
    cards.append(("rejected / refused / failed", f"{fmt(t.rejected)} / {fmt(t.refused)} / {fmt(t.failed)}"))
    cards.append(("bytes up / down", f"{fmt_bytes(t.bytes_up)} / {fmt_bytes(t.bytes_down)}"))
    ratio = num(s.compression.ratio_up) if s is not None else None
    if s is not None and ratio is not None and abs(ratio - 1.0) > 1e-9:
        cards.append(("upload compression", f"{ratio:.2f}x ({clean(s.compression.codec, 20)})"))
    if s is not None and num(s.sparsity):
        cards.append(("final sparsity", f"{100 * s.sparsity:.1f}%"))
    return cards


# ---------------------------------------------------------------------------- events, rounds, summary
def _capped(items: list[list[str]], headers: list[str], what: str) -> Capped:
    if not items:
        return Capped(what, None)
    more = len(items) - MAX_TABLE_ROWS
    return Capped(what, Table(headers, items[:MAX_TABLE_ROWS], "events"), f"{more:,}" if more > 0 else "")


def events_section(data: RunData) -> EventsSection:
    """Rejections (summary first, else the rounds), refusals, and failures with their audit.jsonl reasons."""
    s, rows = data.summary, data.rows
    if s is not None and s.rejections:
        rejections = [(r.round, r.site or r.node_id or "?", r.reason) for r in s.rejections]
    else:  # from the rounds instead (no summary)
        rejections = [(row.round, r.site or r.node_id or "?", r.reason) for row in rows for r in row.rejections]
    rej = [[fmt(rnd), clean(who, 80), clean(reason)] for rnd, who, reason in rejections]
    by_reason: dict[str, int] = {}
    for _, _, reason in rejections:
        key = NUMBER.sub("N", clean(reason, 120))
        by_reason[key] = by_reason.get(key, 0) + 1
    reasons = None
    if by_reason and len(rej) > 3:
        reasons = Table(["reason (numbers as N)", "count"], sorted(([k, str(v)] for k, v in by_reason.items()), key=lambda kv: -int(kv[1])),
                        "compact")
    refusals = [[fmt(row.round), clean(r.site or "?", 80), clean(r.reason)] for row in rows for r in row.refusals]
    failed = [[fmt(a.round), clean(a.site or "?", 80), clean(a.reason, 300)] for a in data.audit if a.event == "site_failed"]
    n_failed = s.failed_replies if s is not None else sum(r.failed + r.timed_out for r in rows)
    bounded = [[fmt(row.round), clean(b.site or "?", 80), clean(b.reason)] for row in rows for b in row.bounded]
    bounded += [[fmt(row.round), "(global model)", clean(f"aggregate discarded, previous model kept: {row.model_kept}")]
                for row in rows if row.model_kept]
    return EventsSection(
        reasons=reasons, rejected=_capped(rej, ["round", "site", "reason"], "rejected updates"),
        refused=_capped(refusals, ["round", "site", "reason"], "refused rounds"),
        failed=_capped(failed, ["round", "site", "reason (from audit.jsonl)"], "failures") if failed else None,
        unexplained_failures=f"{n_failed:,}" if not failed and n_failed else "",
        bounded=_capped(bounded, ["round", "site", "what was bounded"], "bounded updates") if bounded else None)


def rounds_section(rows: list[MetricsRow]) -> RoundsSection:
    """One line per round."""
    body = []
    regression = any("r2" in r.central for r in rows)
    for r in rows:
        c = r.central
        first = [fmt(c.get("r2")), fmt(c.get("rmse"))] if regression else [fmt(c.get("accuracy")), fmt(c.get("auc")) if "auc" in c else "—"]
        body.append([str(r.round), *first, fmt(c.get("loss")), fmt(r.train_loss),
                     fmt(r.sampled), fmt(r.accepted), fmt(r.rejected), fmt(r.refused), fmt(r.failed + r.timed_out),
                     fmt_bytes(r.bytes_up), fmt_bytes(r.bytes_down), fmt(r.sparsity, 3),
                     fmt(r.watermark.p_value, 3) if r.watermark else "—", fmt(r.round_seconds, 2)])
    quality = ["R²", "RMSE", "MSE"] if regression else ["accuracy", "AUC", "loss"]
    headers = ["round", *quality, "train loss", "sampled", "accepted", "rejected", "refused", "failed", "bytes up",
               "bytes down", "sparsity", "watermark p", "seconds"]
    return RoundsSection(len(rows), Table(headers, body, "rounds"), open=len(rows) <= OPEN_ROUNDS)


def _flatten(prefix: str, obj: Any, out: list[list[str]]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if k == "sites" and prefix in ("privacy", "federated_evaluation", "federated_evaluation.last"):
                out.append([f"{prefix}.sites", f"{len(v) if isinstance(v, dict) else 0} site(s): see the table above"])
            elif k == "rejections" and isinstance(v, list):
                out.append([f"{prefix}.{k}".lstrip("."), f"{len(v)} item(s): see above"])
            else:
                _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list):
        out.append([prefix, clean(json.dumps(obj, default=str), 300) if obj else "[]"])
    elif isinstance(obj, float):
        out.append([prefix, f"{obj:.6g}" if math.isfinite(obj) else str(obj)])
    else:
        out.append([prefix, "—" if obj is None else clean(obj, 300)])


def summary_table(data: RunData) -> Table | None:
    """summary.json field by field (as the schema reads it); None without a usable summary."""
    if data.summary is None:
        return None
    rows: list[list[str]] = []
    _flatten("", dump(data.summary), rows)
    return Table(["field", "value"], rows, "kv")
