"""The site's privacy gate for one round: its own limits, its ledger (locked for the round), and the DP plan charged up front.

Everything here is decided by the site's policy, never by what the coordinator sends: the
noise is calibrated over the site's own planning horizon, the round's epsilon is capped by
the site, local epochs and batch size are bounded by the site, label-dependent weighting is
refused under DP, and the planned spend is charged to the ledger before any record is touched.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedseek.runtime.site_runtime import SiteRuntime
from fedseek.wire.records import RoundConfig

if TYPE_CHECKING:  # the privacy layer imports Opacus (~2 s): only sites that train under DP pay for it
    from fedseek.privacy import DPRound, PrivacyLedger
    from fedseek.privacy.ledger_chain import LedgerKind

log = logging.getLogger("fedseek.site")


@dataclass
class RoundGate:
    """The outcome of the gate: a DP round to run (charged), or a refusal reason; the ledger when one was opened."""

    dp: DPRound | None = None
    ledger: PrivacyLedger | None = None
    refusal: str | None = None


AUTO_STEP = 0.5  # recipe auto: lr x max_grad_norm, the longest step one clipped full-batch gradient can take (see docs/privacy.md)


def site_recipe(site: SiteRuntime, cfg: RoundConfig) -> RoundConfig:
    """The round's recipe as this site runs it: under DP with recipe auto, the site's own (from its record count and clip norm).

    One noisy gradient step on all of the site's records per round (DP-FedSGD), batches of at most the site's
    max_batch_size, and a learning rate that makes lr x max_grad_norm = AUTO_STEP. Rules fixed in advance and tuned
    on public data (digits, breast cancer), never on the site's records: choosing them costs no privacy. The record
    count is treated as public, as everywhere in DP-SGD (it sets the sampling rate, and the site reports it).
    """
    pol = site.privacy
    if cfg.recipe != "auto" or pol is None or len(site.y) == 0:
        return cfg
    batch = min(len(site.y), pol.max_batch_size)
    return cfg.model_copy(update={"batch_size": batch, "local_epochs": 1, "momentum": 0.0, "lr": AUTO_STEP / pol.max_grad_norm,
                                  "proximal_mu": 0.0})


def policy_refusal(site: SiteRuntime, cfg: RoundConfig) -> str | None:
    """Why the site's own policy refuses this round's recipe (None = acceptable)."""
    pol = site.privacy
    if len(site.y) == 0:
        return "the site has no training records (all held out or none loaded)"
    if pol is None:
        return None
    if cfg.local_epochs > pol.max_local_epochs:
        return f"local-epochs {cfg.local_epochs} exceeds the site's max_local_epochs {pol.max_local_epochs}"
    if cfg.batch_size > pol.max_batch_size:
        return f"batch-size {cfg.batch_size} exceeds the site's max_batch_size {pol.max_batch_size}"
    if cfg.weighting != "none":
        return (f"weighting {cfg.weighting!r} depends on the site's private label counts and is refused under DP "
                "(use privacy.class_weights)")
    if pol.class_weights is not None and len(pol.class_weights) != site.num_classes:
        return f"privacy.class_weights has {len(pol.class_weights)} values for {site.num_classes} classes"
    n = len(site.y)
    if pol.delta >= 1.0 / n:
        return f"delta {pol.delta:g} is not below 1/n = {1.0 / n:.3g} for {n} records"
    return None


def open_ledger(site: SiteRuntime, kind: LedgerKind = "training") -> PrivacyLedger:
    """The site's training or evaluation ledger (LedgerError when it is missing after init, tampered or inconsistent)."""
    from fedseek.privacy import PrivacyLedger

    pol = site.privacy
    assert pol is not None
    budget = pol.epsilon_budget if kind == "training" else pol.evaluation.epsilon_budget
    # A policy that names no accountant gets the default (PRV) for a new ledger; an existing one keeps its own.
    return PrivacyLedger(site.state_dir, accountant=pol.accountant, delta=pol.delta, epsilon_budget=budget, site=site.name, kind=kind,
                         keep_accountant="accountant" not in pol.model_fields_set)


@contextlib.contextmanager
def training_gate(site: SiteRuntime, cfg: RoundConfig) -> Iterator[RoundGate]:
    """Hold the site's ledger lock for the whole round; plan the noise and charge the round before training."""
    from fedseek.privacy import BF16_NORM_SLACK, BudgetExceeded, DPRound, LedgerError, noise_for_round, plan_round

    pol = site.privacy
    assert pol is not None
    try:
        ledger = open_ledger(site)
        lock = ledger.lock()
        lock.__enter__()
    except LedgerError as exc:
        yield RoundGate(refusal=str(exc))
        return
    try:
        rnd = cfg.server_round
        q, steps = plan_round(len(site.y), cfg.batch_size, cfg.local_epochs)
        slack = BF16_NORM_SLACK if site.precision == "bf16" else 1.0
        try:
            noise = noise_for_round(pol, ledger, q, steps)
            projected = ledger.check(noise, q, steps, run_id=cfg.run_id, server_round=rnd)
            # distributed: the site injects its share; the secure sum of >= min_sites - colluders honest shares carries `noise`
            share = noise / math.sqrt(pol.distributed.honest) if pol.mode == "distributed" else None
            dp = DPRound(pol, ledger, noise, run_id=cfg.run_id, server_round=rnd, slack=slack, share=share)
            dp.charge(q, steps)
        except (BudgetExceeded, LedgerError) as exc:
            yield RoundGate(ledger=ledger, refusal=str(exc))
            return
        log.info("site %s round %d: DP noise %.4f%s q %.4f steps %d -> epsilon %.4f (charged)", site.name, rnd, noise,
                 f" (share {share:.4f})" if share is not None else "", q, steps, projected)
        yield RoundGate(dp=dp, ledger=ledger)
    finally:
        lock.__exit__(None, None, None)
