"""The report's per-site section: privacy (DP on) or participation (DP off) per site, aggregated beyond MAX_SITE_ROWS sites.

A federation of 10,000 virtual sites would make a 10,000-row table nobody reads: above
MAX_SITE_ROWS the section shows min / median / max of every column over all sites and the rows of
the sites that need a look (excluded or refusing first, then the highest epsilon or the fewest
rounds trained); summary.json and metrics.jsonl keep every site's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedseek.outputs.report_data import RunData
from fedseek.outputs.report_format import Table, clean, fmt, num
from fedseek.outputs.schema import MetricsRow, SitePrivacy

MAX_SITE_ROWS = 200  # more sites than this: min / median / max over all of them, and the rows of the sites that need a look
_VIEW_VALUES = ("epsilon", "delta", "noise_multiplier", "sample_rate", "num_examples", "train_loss")


@dataclass(frozen=True)
class SitesSection:
    """Per-site privacy (DP on) or participation (DP off); beyond MAX_SITE_ROWS sites, an aggregate and the sites to look at."""

    title: str
    table: Table | None
    notes: list[str]
    aggregate: Table | None = None


@dataclass
class _Seen:
    """A site as metrics.jsonl shows it: rounds trained / refused, DP steps, last reported values."""

    trained: int = 0
    refused: int = 0
    steps: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    last_status: str = ""


def _seen_in_rows(rows: list[MetricsRow]) -> dict[str, _Seen]:
    seen: dict[str, _Seen] = {}
    for row in rows:
        for name, view in row.sites.items():
            d = seen.setdefault(name, _Seen())
            if view.status == "refused":
                d.refused += 1
            else:
                d.trained += 1
                if view.dp_steps is not None:
                    d.steps = (d.steps or 0) + view.dp_steps
                d.values.update({k: getattr(view, k) for k in _VIEW_VALUES if num(getattr(view, k)) is not None})
            d.last_status = f"{view.status} (round {row.round})"
    return seen


def _site_row(name: str, summary: SitePrivacy | None, m: _Seen, data: RunData) -> list[str]:
    """One site's cells: the summary's values first, what metrics.jsonl showed otherwise."""
    s = summary.model_dump(exclude_none=True) if summary is not None else {}
    privacy = data.privacy
    excluded = data.summary.excluded_sites if data.summary is not None else {}
    note = clean(excluded[name], 160) if name in excluded else m.last_status
    trained, refusals = s.get("rounds_trained", m.trained), s.get("refusals", m.refused)
    if not privacy.enabled:
        return [name, fmt(trained), fmt(refusals), fmt(m.values.get("num_examples"), 0), fmt(m.values.get("train_loss")), note]
    eps = s.get("epsilon", m.values.get("epsilon"))
    finite = num(eps)
    pct = 100 * finite / privacy.budget if privacy.budget and finite is not None else None
    used = "—" if pct is None else f"{pct:.1f}%" if pct < 99.95 else f"{pct:.2f}%"
    steps = s.get("steps") if num(s.get("steps")) is not None else m.steps

    def value(key: str) -> Any:  # the summary's value, else the last one metrics.jsonl showed
        return s.get(key, m.values.get(key))

    return [name, fmt(eps), used, fmt(value("delta"), 2), fmt(value("noise_multiplier"), 3), fmt(value("sample_rate"), 3),
            fmt(steps, 0), fmt(trained), fmt(refusals), fmt(m.values.get("num_examples"), 0), note]


def sites_section(data: RunData) -> SitesSection:
    """Per-site privacy (DP on) or participation (DP off), merged from summary.json and metrics.jsonl."""
    privacy = data.privacy
    title = "Per-site privacy" if privacy.enabled else "Per-site participation"
    per = privacy.summary.sites
    seen = _seen_in_rows(data.rows)
    names = sorted(set(per) | set(seen))
    if not names:
        return SitesSection(title, None, [])
    rows = [_site_row(n, per.get(n), seen.get(n) or _Seen(), data) for n in names]
    if privacy.enabled:
        headers = ["site", "epsilon", "of budget", "delta", "noise multiplier", "sample rate", "DP steps", "rounds trained",
                   "refusals", "examples", "last status / exclusion"]
    else:
        headers = ["site", "rounds trained", "refusals", "examples", "last train loss", "last status / exclusion"]
    notes = []
    if privacy.enabled:
        notes.append("Epsilon is what each site reported with its last accepted update (its ledger may hold more: rounds whose "
                     "update was rejected or failed still spent budget at the site). DP steps are summed over accepted rounds.")
    missing = sorted(set(seen) - set(per)) if per else []
    if missing:
        notes.append(f"{len(missing)} site(s) appear in metrics.jsonl but not in summary.json.")
    if len(rows) <= MAX_SITE_ROWS:
        return SitesSection(title, Table(headers, rows, "sites"), notes)
    notes.append(f"{len(rows):,} sites: above, min / median / max over all of them; the table shows the {MAX_SITE_ROWS} that most need a "
                 "look (excluded or refusing first, then " + ("the highest epsilon" if privacy.enabled else "the fewest rounds trained")
                 + "). Every site's figures are in summary.json and metrics.jsonl.")
    return SitesSection(title, Table(headers, _needing_a_look(headers, rows)[:MAX_SITE_ROWS], "sites"), notes,
                        aggregate=_aggregate(headers, rows))


def _cell_number(cell: str) -> float | None:
    """A table cell back as a number ('1,234', '12.5%', '0.1234'), None for text and dashes."""
    try:
        return float(cell.replace(",", "").rstrip("%"))
    except ValueError:
        return None


def _aggregate(headers: list[str], rows: list[list[str]]) -> Table:
    """Min / median / max of every numeric column over all sites (and how many sites have a value)."""
    body = []
    for i, head in enumerate(headers[1:], start=1):
        values = sorted(v for v in (_cell_number(r[i]) for r in rows) if v is not None)
        if values:
            body.append([head, f"{len(values):,}", fmt(values[0]), fmt(values[len(values) // 2]), fmt(values[-1])])
    return Table(["column", "sites", "min", "median", "max"], body, "sites")


def _needing_a_look(headers: list[str], rows: list[list[str]]) -> list[list[str]]:
    """Excluded or refusing sites first, then the highest epsilon (DP) or the fewest rounds trained."""
    col = {h: i for i, h in enumerate(headers)}

    def key(r: list[str]) -> tuple[int, float]:
        refused = (_cell_number(r[col["refusals"]]) or 0) > 0 or "excluded" in r[-1] or "refused" in r[-1]
        if "epsilon" in col:
            return (0 if refused else 1, -(_cell_number(r[col["epsilon"]]) or 0.0))
        return (0 if refused else 1, _cell_number(r[col["rounds trained"]]) or 0.0)

    return sorted(rows, key=key)
