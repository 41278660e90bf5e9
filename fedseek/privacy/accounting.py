"""The analysis: epsilon of a DP-SGD history under an Opacus accountant (cached), and the noise that fits a budget."""

from __future__ import annotations

import functools

from opacus.accountants import create_accountant


def compress_history(history: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Merge entries with the same (noise, sample rate): composing n1 then n2 steps is n1+n2 steps (exact)."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        merged[key] = merged.get(key, 0) + int(n)
    return tuple((s, q, n) for (s, q), n in merged.items() if n > 0)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """One accountant evaluation per distinct (history, delta, accountant): PRV takes ~1 s, sites ask often."""
    import warnings

    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha" at very high noise: bound still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a (noise, sample_rate, steps) history under the named Opacus accountant."""
    merged = compress_history(history)
    if not merged:
        return 0.0
    return _epsilon_cached(merged, float(delta), accountant)


@functools.lru_cache(maxsize=256)
def fit_noise(
    history: tuple[tuple[float, float, int], ...], q: float, steps: int, budget: float, delta: float, accountant: str
) -> float | None:
    """Smallest noise multiplier in [0.3, 50] keeping `steps` more steps within `budget` (bisection), or None if none does.

    Cached on its arguments (pass `compress_history(...)`): sites with equal plans share the answer.
    """
    def eps(sigma: float) -> float:
        return epsilon_for(list(history) + [(sigma, q, steps)], delta, accountant)

    lo, hi = 0.3, 50.0
    if eps(hi) > budget:
        return None
    if eps(lo) <= budget:
        return lo
    while hi - lo > 2e-3 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi
