"""A site's share of `scaling: federated`: per-column sums and sums of squares of its raw training values, before round 1.

Without DP the sums are exact. Under DP the site clips every value into its column's public
[low, high], centres it at the midpoint and divides by the half-range r (squares by r^2), so
one record moves each of the 2d released numbers by at most 1 (L2 sensitivity sqrt(2d)); it
adds Gaussian noise of std sigma * sqrt(2d), with sigma set by the site's own
`privacy.scaling_epsilon`, and charges that mechanism (sample rate 1, one step) to its training
ledger under the ledger's lock BEFORE it looks at a record. The record count is public (as in
every training reply). Held-out evaluation records never enter the statistics.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Context, Message, RecordDict

from fedseek.runtime.site_eval import secure_normal
from fedseek.runtime.site_privacy import open_ledger
from fedseek.runtime.site_runtime import SiteRuntime, resolve_site, schema_refusal
from fedseek.wire.records import CONFIG, METRICS, SITE, RecordError, RefusalMetrics, StatsReply, StatsRequest, refusal_content, site_record

log = logging.getLogger("fedseek.site")
STATS_ROUND = 0  # the ledger's round number of the statistics release (training rounds start at 1)


def column_values(site: SiteRuntime, req: StatsRequest) -> np.ndarray:
    """The site's raw training values of the requested columns (target last), rows x columns; ValueError naming a missing column."""
    names = list(site.schema.features or []) if site.schema is not None else []
    missing = [c for c in req.columns if c not in names]
    if missing:
        raise ValueError(f"requested columns {missing[:5]} are not among this site's features")
    cols = [site.x.reshape(len(site.x), -1)[:, names.index(c)].astype(np.float64) for c in req.columns]
    if req.target is not None:
        if site.schema is None or site.schema.task != "regression":
            raise ValueError("a target statistic was requested but this site's task is not regression")
        cols.append(np.asarray(site.y, dtype=np.float64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(site.x), 0))


def exact_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column sum and sum of squares."""
    return values.sum(axis=0), (values**2).sum(axis=0)


def normalized_sums(values: np.ndarray, bounds: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-column sums of clip(v) centred at the bounds' midpoint over the half-range r, and of their squares (each in [0, 1])."""
    lo = np.array([b[0] for b in bounds], dtype=np.float64)
    hi = np.array([b[1] for b in bounds], dtype=np.float64)
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    z = (np.clip(values, lo, hi) - mid) / half
    return z.sum(axis=0), (z**2).sum(axis=0)


def handle_stats(msg: Message, context: Context) -> Message:
    """Answer the coordinator's statistics request (exact, or a DP release charged first), or refuse with one line."""
    site = resolve_site(context)
    try:
        req = StatsRequest.from_record(msg.content.config_records[CONFIG])
    except (RecordError, KeyError) as exc:
        return _refuse(msg, site, f"malformed statistics request: {exc}")
    reason = schema_refusal(site, req.data_schema)
    if reason is None and site.scaling != "federated":
        reason = (f"this site's preprocessing.scaling is {site.scaling!r}: its rows are already scaled, so it cannot give raw "
                  "statistics (set scaling: federated, as the coordinator's task does)")
    if reason is None and len(site.y) == 0:
        reason = "the site has no training records"
    if reason is not None:
        return _refuse(msg, site, reason)
    try:
        values = column_values(site, req)
    except ValueError as exc:
        return _refuse(msg, site, str(exc))
    if site.privacy is None:
        s1, s2 = exact_sums(values)
        return _reply(msg, site, StatsReply(num_examples=len(values), sums=s1.tolist(), squares=s2.tolist()))
    return _private(msg, site, req, values)


def _private(msg: Message, site: SiteRuntime, req: StatsRequest, values: np.ndarray) -> Message:
    """Charge one Gaussian release to the training ledger (locked), then release the noisy normalised sums."""
    from fedseek.privacy import BudgetExceeded, LedgerError
    from fedseek.privacy.accounting import fit_noise

    pol = site.privacy
    assert pol is not None
    names = [*req.columns, *([req.target] if req.target is not None else [])]
    lacking = [c for c in names if c not in req.bounds]
    if lacking:
        return _refuse(msg, site, f"under DP every column needs public bounds (preprocessing.bounds); missing for {lacking[:5]}")
    try:
        ledger = open_ledger(site)
        sigma = fit_noise((), 1.0, 1, float(pol.scaling_epsilon), float(pol.delta), ledger.accountant)
        if sigma is None:
            return _refuse(msg, site, f"privacy.scaling_epsilon {pol.scaling_epsilon:g} is too small for one release (noise above 50)")
        with ledger.lock():
            ledger.check(sigma, 1.0, 1, run_id=req.run_id, server_round=STATS_ROUND)
            eps = ledger.charge(sigma, 1.0, 1, run_id=req.run_id, server_round=STATS_ROUND)
    except BudgetExceeded as exc:
        return _refuse(msg, site, f"scaling statistics: {exc}")
    except LedgerError as exc:
        return _refuse(msg, site, f"privacy ledger: {exc}")
    s1, s2 = normalized_sums(values, [tuple(req.bounds[c]) for c in names])  # type: ignore[misc]
    std = float(sigma) * math.sqrt(2.0 * len(names))
    z = secure_normal(2 * len(names)) * std
    log.info("site %s scaling statistics: %d columns, sigma %.3f (noise std %.3f per normalised sum) -> epsilon %.4f (charged)",
             site.name, len(names), sigma, std, eps)
    out = StatsReply(num_examples=len(values), sums=(s1 + z[: len(names)]).tolist(), squares=(s2 + z[len(names):]).tolist(),
                     normalized=1, noise_std=std, epsilon=eps, delta=ledger.delta)
    return _reply(msg, site, out)


def _reply(msg: Message, site: SiteRuntime, stats: StatsReply) -> Message:
    return Message(content=RecordDict({METRICS: stats.to_record(), SITE: site_record(site.name)}), reply_to=msg)


def _refuse(msg: Message, site: SiteRuntime, reason: str) -> Message:
    log.warning("site %s refuses the scaling statistics: %s", site.name, reason)
    return Message(content=refusal_content(reason, RefusalMetrics(num_examples=int(len(site.y))), site.name), reply_to=msg)
