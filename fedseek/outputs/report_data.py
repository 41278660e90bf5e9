"""The run's data for the report: its files read through the typed schema, and facts derived from them.

metrics.jsonl and summary.json are read with `fedseek.outputs.schema`; audit.jsonl (failure
reasons) and model.json are optional extras. Nothing here raises for a bad file: what could
not be read becomes a one-line note the page shows, and the page is built from the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedseek.outputs.report_format import num
from fedseek.outputs.schema import MetricsRow, PrivacySummary, RunSummary, SchemaError, parse_row, read_rows, read_summary

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
AUDIT_NAME = "audit.jsonl"
MODEL_NAME = "model.json"
SITE_EVENTS = ("site_joined", "site_failed", "update_rejected")  # audit events that name a site of the run

Track = list[tuple[int, float]]  # (round, epsilon) as a site reported it
Refusal = tuple[int, float, str]  # (round, epsilon the site would reach, or had spent; site)


class AuditEvent(BaseModel):
    """The fields of an audit.jsonl event the report uses (events carry more; extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    event: str = ""
    round: int | None = None
    site: str = ""
    reason: str = ""


@dataclass(frozen=True)
class PrivacyFacts:
    """Whether the run was DP (per the summary, or any site reporting epsilon), its budget, and the summary's section."""

    enabled: bool
    budget: float | None
    summary: PrivacySummary


@dataclass
class RunData:
    """Everything the report is built from."""

    run_dir: Path
    rows: list[MetricsRow]  # one per round, sorted; a later row for the same round wins (resumed runs)
    summary: RunSummary | None  # None: missing or not a valid summary.json (the run did not finish)
    audit: list[AuditEvent] = field(default_factory=list)
    model: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each

    @property
    def rounds(self) -> list[int]:
        """The round numbers, in order."""
        return [r.round for r in self.rows]

    @cached_property
    def privacy(self) -> PrivacyFacts:
        """DP on or off, and the per-site epsilon budget (summary first, else what refusing sites reported)."""
        priv = self.summary.privacy if self.summary is not None else PrivacySummary()
        budget = num(priv.epsilon_budget)
        any_eps = False
        for row in self.rows:
            for view in row.sites.values():
                any_eps = any_eps or num(view.epsilon) is not None
                if budget is None and num(view.epsilon_budget) is not None:
                    budget = view.epsilon_budget
        return PrivacyFacts(enabled=priv.enabled or any_eps, budget=budget, summary=priv)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; problems become notes, never exceptions."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    rows = _read_metrics(run_dir / METRICS_NAME, notes)
    summary = _read_summary(run_dir / SUMMARY_NAME, notes)
    audit = _read_audit(run_dir / AUDIT_NAME, notes)
    model = _read_model(run_dir / MODEL_NAME)
    prefix = f"{run_dir}{os.sep}"
    notes = [n.replace(prefix, "") for n in notes]  # schema messages name the file by its full path
    return RunData(run_dir=run_dir, rows=rows, summary=summary, audit=audit, model=model, notes=notes)


def _by_round(rows: list[MetricsRow]) -> list[MetricsRow]:
    by_round = {r.round: r for r in rows}
    return [by_round[k] for k in sorted(by_round)]


def _read_metrics(path: Path, notes: list[str]) -> list[MetricsRow]:
    if not path.exists():
        notes.append(f"{path.name} is missing")
        return []
    try:
        rows = read_rows(path)
        text = path.read_text(errors="replace")
    except (SchemaError, UnicodeDecodeError):
        return _by_round(_salvage_rows(path, notes))
    except OSError as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}: {exc})")
        return []
    dropped = sum(1 for line in text.splitlines() if line.strip()) - len(rows)
    if dropped > 0:
        notes.append(f"{path.name}: {dropped} line(s) skipped (a partial last line is normal after a crash)")
    return _by_round(rows)


def _salvage_rows(path: Path, notes: list[str]) -> list[MetricsRow]:
    """Every line that is a valid metrics row; the others are counted in one note naming the first problem."""
    rows: list[MetricsRow] = []
    bad, first = 0, ""
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_row(json.loads(line), f"{path.name}:{i}"))
        except SchemaError as exc:
            bad, first = bad + 1, first or str(exc)
        except ValueError:
            bad, first = bad + 1, first or f"{path.name}:{i}: not a JSON line"
    if bad:
        notes.append(f"{path.name}: {bad} line(s) skipped (first: {first}; a partial last line is normal after a crash)")
    return rows


def _read_summary(path: Path, notes: list[str]) -> RunSummary | None:
    if not path.exists():
        return None  # the page says so in its own banner
    try:
        return read_summary(path)
    except (SchemaError, ValueError) as exc:
        notes.append(str(exc) if isinstance(exc, SchemaError) else f"{path.name} could not be read ({type(exc).__name__}: {exc})")
        return None


def _read_audit(path: Path, notes: list[str]) -> list[AuditEvent]:
    if not path.exists():
        return []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        notes.append(f"{path.name} could not be read ({exc})")
        return []
    events, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            events.append(AuditEvent.model_validate_json(line))
        except ValidationError:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) skipped (not an audit event; a partial last line is normal after a crash)")
    return events


def _read_model(path: Path) -> dict[str, Any] | None:
    """model.json (how to rebuild the model), shown as facts; ignored when absent or unreadable."""
    try:
        obj = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def epsilon_tracks(rows: list[MetricsRow]) -> tuple[dict[str, Track], list[Refusal]]:
    """Per site the epsilons it reported with accepted updates, and the refusals (projected epsilon, else spent)."""
    tracks: dict[str, Track] = {}
    refusals: list[Refusal] = []
    for row in rows:
        for site, view in row.sites.items():
            eps = num(view.epsilon)
            if view.status == "refused":
                y = num(view.projected_epsilon)
                y = y if y is not None else eps
                if y is not None:
                    refusals.append((row.round, y, site))
                continue
            if eps is not None:
                tracks.setdefault(site, []).append((row.round, eps))
    return tracks, refusals


def carry_forward(track: Track, rounds: list[int]) -> list[float | None]:
    """Epsilon is cumulative: between reports a site keeps what it last reported."""
    known = dict(track)
    out: list[float | None] = []
    last: float | None = None
    for r in rounds:
        last = known.get(r, last)
        out.append(last)
    return out


def known_sites(data: RunData) -> set[str]:
    """Every site name the run mentions (joined, trained, refused, rejected, failed)."""
    names = set(data.privacy.summary.sites)
    for row in data.rows:
        names |= set(row.sites)
        names |= {r.site for r in [*row.rejections, *row.refusals] if r.site}
    names |= {a.site for a in data.audit if a.site and a.event in SITE_EVENTS}
    return names
