"""A round's DP plan at a site: sampling rate and steps, and the noise multiplier its policy asks for."""

from __future__ import annotations

from typing import Any

from fedseek.privacy.ledger import PrivacyLedger


def noise_for_round(
    policy: Any, ledger: PrivacyLedger, sample_rate: float, steps: int, remaining_rounds: int
) -> float:
    """Pick this round's noise from the site policy (fixed, per-round target, or fit-the-budget)."""
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
                accountant=policy.accountant,
            )
        )
    # Fit the budget: calibrate once for the announced plan and keep it (constant noise keeps the
    # ledger's history short and the guarantee easy to audit); recalibrate only if it no longer fits.
    if ledger.calibrated_noise is not None:
        if ledger.projected_epsilon(ledger.calibrated_noise, sample_rate, steps * remaining_rounds) <= ledger.epsilon_budget:
            return float(ledger.calibrated_noise)
    ledger.calibrated_noise = ledger.calibrate_noise(sample_rate, steps, remaining_rounds)
    return float(ledger.calibrated_noise)


def plan_round(num_records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Opacus Poisson sampling plan: sample rate 1/ceil(n/B) and the steps `epochs` take."""
    batches = max(1, -(-num_records // max(1, batch_size)))
    return 1.0 / batches, epochs * batches
