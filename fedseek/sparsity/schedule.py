"""The coordinator's pruning schedule: how sparse the global model should be after each round."""

from __future__ import annotations

import math

from fedseek.sparsity.masks import check_sparsity


def schedule_sparsity(
    round: int,
    total_rounds: int,
    final_sparsity: float,
    start_round: int = 1,
    end_fraction: float = 0.75,
    initial_sparsity: float = 0.0,
) -> float:
    """Zhu & Gupta (2017) cubic schedule: s_t = s_f + (s_i - s_f)(1 - p)^3, p ramps 0->1 over the run's first `end_fraction`.

    Rounds are 1-based (Flower). Sparsity is `initial_sparsity` up to `start_round`, rises
    monotonically and reaches `final_sparsity` at round ceil(end_fraction * total_rounds).
    """
    if total_rounds < 1 or round < 0 or start_round < 0:
        raise ValueError(f"need total_rounds >= 1 and non-negative rounds, got round={round}, total={total_rounds}, start={start_round}")
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
    sf = check_sparsity(final_sparsity)
    si = check_sparsity(initial_sparsity)
    end_round = max(start_round, math.ceil(end_fraction * total_rounds))
    if round <= start_round:
        return si if end_round > start_round or round < start_round else sf
    if round >= end_round:
        return sf
    p = (round - start_round) / (end_round - start_round)
    return sf + (si - sf) * (1.0 - p) ** 3
