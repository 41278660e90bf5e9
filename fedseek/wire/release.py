"""What each field a site sends reveals: DP-protected, public by declaration, or non-DP only.

Every field of every reply record must be listed here with its status and the reason; a test
fails when a field is added to a reply record without one. docs/privacy.md explains the
declarations. Statuses:
  dp       - computed from the records through the accounted mechanism (or post-processing of it);
  public   - depends only on the site's declared policy, its public record counts and the
             coordinator's own messages, never on record contents;
  non-dp   - released only by sites that do not train under DP (None/absent under DP).
"""

from __future__ import annotations

from typing import Literal

Status = Literal["dp", "public", "non-dp"]

_COUNT = "the site's record counts are public in fedseek's model (the aggregation weight; docs/privacy.md)"
_POLICY = "a function of the site's declared policy, its public record count and its past (accounted) releases"

TRAIN_REPLY: dict[str, tuple[Status, str]] = {
    "num_examples": ("public", _COUNT),
    "train_loss": ("non-dp", "an unnoised average over the training records: never sent under DP"),
    "train_seconds": ("public", "time depends on the number of steps and the CSPRNG-drawn batch sizes, not on record contents"),
    "steps": ("public", "epochs * ceil(n/B), from the public count and the round config"),
    "payload_bytes": ("dp", "size of the encoded DP update (post-processing of the DP release)"),
    "dense_bytes": ("public", "the model's size"),
    "epsilon": ("public", _POLICY),
    "delta": ("public", "the site's declared policy"),
    "noise_multiplier": ("public", _POLICY),
    "sample_rate": ("public", "1/ceil(n/B): public count and round config"),
    "dp_steps": ("public", "epochs * ceil(n/B)"),
    "dp_steps_total": ("public", "sum of past dp_steps"),
    "epsilon_budget": ("public", "the site's declared policy"),
    "local_epsilon": ("public", _POLICY + " (distributed DP: the epsilon of the site's own noise shares alone)"),
}

UPDATE: dict[str, tuple[Status, str]] = {
    "delta": ("dp", "the DP-SGD model delta (clipped per record, noised, accounted); its encoding is post-processing"),
    "error_feedback": ("dp", "residuals of earlier DP releases (post-processing)"),
    "secure_share": ("dp", ("distributed DP: n x (the site's clipped full-batch step with its noise share), quantized and masked "
                           "by SecAgg+; only the sum of >= min_sites sites' values is unmasked, and it carries the accounted "
                           "noise; the share alone is the site's local floor (docs/privacy.md)")),
}

SECURE_PROTOCOL: dict[str, tuple[Status, str]] = {
    "public_keys": ("public", "SecAgg+ set-up: two fresh public keys from the site's CSPRNG, independent of its records"),
    "encrypted_shares": ("public", "SecAgg+ key exchange: shares of the site's fresh secrets, encrypted to each neighbour"),
    "key_shares": ("public", "SecAgg+ unmasking: shares of other sites' fresh mask secrets, never of record data"),
}

REFUSAL_REPLY: dict[str, tuple[Status, str]] = {
    "num_examples": ("public", _COUNT),
    "epsilon": ("public", _POLICY),
    "delta": ("public", "the site's declared policy"),
    "epsilon_budget": ("public", "the site's declared policy"),
    "projected_epsilon": ("public", _POLICY),
    "reason": ("public", "which policy rule refused: no record contents"),
}

EVAL_REPLY: dict[str, tuple[Status, str]] = {
    "num_examples": ("public", _COUNT + "; the held-out side of each record is a keyed PRF of it, independent of its contents"),
    "class_counts": ("dp", "Gaussian mechanism (sensitivity sqrt(3) with class_correct and loss_sum), charged to the evaluation ledger"),
    "class_correct": ("dp", "same Gaussian release as class_counts"),
    "loss_sum": ("dp", "same Gaussian release (clipped per record to loss_clip)"),
    "loss_clip": ("public", "the site's declared policy"),
    "target_sums": ("dp", ("regression: four clipped, normalised sums (sensitivity 2), one Gaussian release charged to the "
                          "evaluation ledger")),
    "noise_std": ("public", _POLICY),
    "epsilon": ("public", _POLICY),
    "delta": ("public", "the site's declared policy"),
    "epsilon_budget": ("public", "the site's declared policy"),
}

STATS_REPLY: dict[str, tuple[Status, str]] = {
    "num_examples": ("public", _COUNT),
    "sums": ("dp", ("under DP: sums of values clipped into public bounds, normalised, Gaussian noise (sensitivity sqrt(2d) with "
                   "squares), charged to the training ledger before computing; exact only from a non-DP site")),
    "squares": ("dp", "same Gaussian release as sums"),
    "normalized": ("public", "whether the site is under DP (its declared policy)"),
    "noise_std": ("public", _POLICY),
    "epsilon": ("public", _POLICY),
    "delta": ("public", "the site's declared policy"),
}

QUERY_REPLY: dict[str, tuple[Status, str]] = {
    "name": ("public", "the site's registered name"),
}


def undeclared(record_fields: set[str], table: dict[str, tuple[Status, str]]) -> set[str]:
    """Fields of a reply record with no declared privacy status (must be empty)."""
    return set(record_fields) - set(table)
