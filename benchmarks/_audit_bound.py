"""The one-run audit bound of Steinke, Nasr & Jagielski 2023 ("Privacy auditing with one (1) training run", NeurIPS 2023).

m canaries are each included independently with probability 1/2 (S_i in {0, 1}); after training the
auditor guesses "included" for some canaries, "excluded" for others, and abstains on the rest. If the
training run is (eps, delta)-DP with respect to each canary, the number W of correct guesses among r
guesses satisfies (their Theorem 5.2 / Proposition 5.7):

    P[W >= v] <= beta + alpha * 2 * m * delta,
    beta  = P[Binomial(r, q) >= v],              q = e^eps / (1 + e^eps)  (accuracy of eps-DP randomized response)
    alpha = max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i.

The empirical lower bound at confidence 1 - p is the largest eps whose p-value is still below p
(for every smaller eps the "is (eps, delta)-DP" hypothesis is rejected). This follows the paper's
reference code (Algorithm in its appendix; the same formula is in google-deepmind/jax_privacy
auditing.py `_one_run_p_value`), vectorized. Choosing the guess counts after seeing the scores is a
multiple test: `audit` picks the best of a fixed grid of (k+, k-) with a Bonferroni-corrected level,
so the reported bound holds at the stated confidence for the whole procedure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct out of r guesses] under the null hypothesis "(eps, delta)-DP" (upper bound); m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    if v == 0:
        return 1.0
    q = float(expit(eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, q) - beta  # P[v - i <= Bin(r, q) < v]
    alpha = float(np.max(window / i, initial=0.0))
    return min(beta + alpha * 2.0 * m * delta, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05, *, tol: float = 1e-6) -> float:
    """Largest eps with p_value(m, r, v, eps, delta) < p: the run is not (eps', delta)-DP for any eps' below it, at confidence 1 - p.

    0 when even eps = 0 cannot be rejected. Bisection (the p-value grows with eps); the returned value
    is on the rejected side (a conservative bound, within `tol`).
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e3:  # v = r with delta = 0 and huge r: practically unbounded
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def guesses(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    """Guess "included" for the k_pos highest scores, "excluded" for the k_neg lowest, abstain between: (guesses r, correct v)."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if k_pos + k_neg > m:
        raise ValueError(f"k+ {k_pos} + k- {k_neg} > m {m}")
    order = np.argsort(scores, kind="stable")  # ascending
    top, bottom = order[m - k_pos:] if k_pos else order[:0], order[:k_neg]
    v = int(included[top].sum()) + int((~included[bottom]).sum())
    return k_pos + k_neg, v


def default_grid(m: int) -> list[tuple[int, int]]:
    """A fixed grid of (k+, k-), chosen before the run: symmetric guesses on 2%, 5%, 10%, 20%, 50% and 100% of the canaries."""
    out = []
    for frac in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        r = max(2, int(round(frac * m)))
        out.append((r // 2, r - r // 2))
    return sorted(set(out))


def audit(scores: np.ndarray, included: np.ndarray, *, delta: float, p: float = 0.05,
          grid: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The one-run audit over a fixed (k+, k-) grid, each tested at level p / len(grid) (Bonferroni): the best bound holds at 1 - p.

    Returns the bound, its (k+, k-), guesses and correct guesses, and every grid point for the record.
    """
    m = len(scores)
    grid = list(grid or default_grid(m))
    level = p / len(grid)
    rows = []
    for kp, kn in grid:
        r, v = guesses(scores, included, kp, kn)
        rows.append({"k_pos": kp, "k_neg": kn, "guesses": r, "correct": v, "precision": v / r if r else math.nan,
                     "epsilon_lb": epsilon_lower_bound(m, r, v, delta, level)})
    best = max(rows, key=lambda row: (row["epsilon_lb"], row["precision"]))
    return {"epsilon_lb": best["epsilon_lb"], "confidence": 1 - p, "bonferroni_tests": len(grid), "per_test_level": level,
            "canaries": m, "included": int(np.sum(included)), "k_pos": best["k_pos"], "k_neg": best["k_neg"],
            "guesses": best["guesses"], "correct": best["correct"], "delta": delta, "grid": rows}


def epsilon_ceiling(m: int, r: int, delta: float, p: float) -> float:
    """The largest bound r guesses can ever give (all correct): the method's resolution limit at this m and r."""
    return epsilon_lower_bound(m, r, r, delta, p)
