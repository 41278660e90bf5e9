"""A round's DP plan at a site: the noise its own policy asks for, over its own planning horizon.

Nothing the coordinator sends decides how fast the budget is spent: calibration uses the
site's `planning_rounds` (never the coordinator's num-rounds), and `max_epsilon_per_round`
raises the noise until one round fits it.
"""

from __future__ import annotations

from typing import Any

from fedseek.privacy.accounting import compress_history, fit_noise
from fedseek.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedseek.privacy.sampling import plan_sampling


def noise_for_round(policy: Any, ledger: PrivacyLedger, sample_rate: float, steps: int) -> float:
    """Pick this round's noise from the site policy (fixed, per-round target, or fit-the-budget), then apply the per-round cap."""
    noise = _policy_noise(policy, ledger, sample_rate, steps)
    cap = getattr(policy, "max_epsilon_per_round", None)
    if cap is None:
        return noise
    spent = ledger.epsilon()
    if ledger.projected_epsilon(noise, sample_rate, steps) - spent <= cap:
        return noise
    history = compress_history(ledger.history)
    capped = fit_noise(history, float(sample_rate), int(steps), spent + float(cap), ledger.delta, ledger.accountant)
    if capped is None:
        raise BudgetExceeded(f"site {ledger.site or '?'}: even noise 50 cannot keep one round within max_epsilon_per_round {cap:g}")
    return max(noise, float(capped))


def _policy_noise(policy: Any, ledger: PrivacyLedger, sample_rate: float, steps: int) -> float:
    if policy.noise_multiplier is not None:
        return float(policy.noise_multiplier)
    if policy.target_epsilon_per_round is not None:
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=policy.target_epsilon_per_round,
                target_delta=policy.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ledger.accountant,
            )
        )
    # Fit the budget over the site's OWN horizon: calibrate once and keep it (constant noise keeps the
    # ledger's history short and the guarantee easy to audit); recalibrate only if it no longer fits.
    remaining = max(1, int(policy.planning_rounds) - ledger.rounds_charged())
    if ledger.calibrated_noise is not None:
        if ledger.projected_epsilon(ledger.calibrated_noise, sample_rate, steps * remaining) <= ledger.epsilon_budget:
            return float(ledger.calibrated_noise)
    ledger.calibrated_noise = ledger.calibrate_noise(sample_rate, steps, remaining)
    return float(ledger.calibrated_noise)


def plan_round(num_records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """The round's DP-SGD mechanism: sample rate exactly 1/k with k = ceil(n/B), and `epochs` * k steps (what the loader takes)."""
    q, per_epoch = plan_sampling(num_records, batch_size)
    return q, epochs * per_epoch
