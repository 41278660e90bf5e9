"""Testing a suspect on the output watermark's logged queries: the sign test (labels) and the score test (probabilities).

Both are exact for any suspect that does not know the key (see fedseek.watermark.outputs): each
unit's served class is a fair coin independent of the suspect's answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseek.watermark.outputs import SCHEME

SCORE_RESOLUTION = 1000  # a unit's weight: its mean probability gap in thousandths (fewer when there are many units)
SCORE_CELLS = 200_000  # bound on the exact null distribution's support (units x resolution)


@dataclass(frozen=True)
class OutputVerdict:
    """The result of testing a suspect on the logged marked queries.

    `test` says which p-value decides: "score" when the suspect gave probabilities (the sign-flip
    test weighted by its probability gap per unit), "sign" when it gave labels only (the units'
    majority answers). Which one applies is fixed by what the suspect returns, never chosen after
    seeing both, so each keeps its level.
    """

    matches: int  # units whose majority answer is the served class
    n: int  # units with a strict majority for one of the pair (the sign test's trials)
    p_value: float
    alpha: float
    logged: int = 0  # every logged marked query
    units: int = 0  # distinct units among them
    test: str = "sign"
    p_sign: float = 1.0
    score_units: int = 0  # units with a non-zero weight in the score test
    scheme: str = SCHEME  # the mark log's scheme

    @property
    def detected(self) -> bool:
        """True when the suspect reproduces the keyed answers beyond chance at level alpha."""
        return self.p_value <= self.alpha and (self.n > 0 or self.score_units > 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        null = ("sign-flip distribution of the sum of the units' probability gaps (served minus other class, mean over the "
                "unit's queries, in integer thousandths), each unit's sign a fair coin (exact)") if self.test == "score" else (
                "Binomial(n, 1/2) upper tail over the units (cell and class pair) where the suspect's answers to the logged "
                "queries have a strict majority for one of the pair (exact)")
        return {"scheme": self.scheme, "test": self.test, "p_value": self.p_value, "alpha": self.alpha, "detected": self.detected,
                "matches": self.matches, "n": self.n, "p_sign": self.p_sign, "score_units": self.score_units, "units": self.units,
                "logged": self.logged, "null": null}


def p_value(matches: int, n: int) -> float:
    """P(Binomial(n, 1/2) >= matches): the exact p-value of `matches` agreements on n units."""
    from scipy.stats import binom

    return float(binom.sf(matches - 1, n, 0.5)) if n else 1.0


def score_p_value(gaps: Sequence[float]) -> tuple[float, int]:
    """The exact p-value of the units' signed gaps (suspect's probability of the served class minus the other's).

    Under the null each unit's served class is a fair coin independent of the suspect, so each gap's
    sign is one too while its size (the canonical pair's gap) is fixed: the statistic, the sum of the
    positive integer weights round(|gap| x resolution), has the distribution of a fair subset sum of
    the weights, computed exactly by convolution. Returns (p-value, units with a non-zero weight).
    """
    dist, observed, units = score_null(gaps)
    return float(min(1.0, dist[observed:].sum())), units


def score_null(gaps: Sequence[float]) -> tuple[np.ndarray, int, int]:
    """The score test's exact null distribution (probability of each statistic value), the observed value, and the units
    with a non-zero weight."""
    g = np.asarray(gaps, dtype=np.float64)
    g = np.clip(g[np.isfinite(g)], -1.0, 1.0)  # a gap between probabilities; an endpoint answering otherwise gains nothing
    resolution = max(1, min(SCORE_RESOLUTION, SCORE_CELLS // max(len(g), 1)))
    w = np.rint(np.abs(g) * resolution).astype(np.int64)
    keep = w > 0
    w, positive = w[keep], g[keep] > 0
    dist = np.zeros(int(w.sum()) + 1)
    dist[0] = 1.0
    top = 0
    for wi in w:  # dist <- (dist + dist shifted by wi) / 2, on the support reached so far
        dist[wi : top + wi + 1] += dist[: top + 1]
        dist[: top + wi + 1] *= 0.5
        top += int(wi)
    return dist, int(w[positive].sum()), int(len(w))


def unit_gaps(suspect_probs: Sequence[dict[str, float]], served: Sequence[Any], other: Sequence[Any], units: Sequence[str]) -> list[float]:
    """Per unit, the suspect's mean probability of the served class minus the other class of the pair (the score test's data)."""
    gaps: dict[str, list[float]] = {}
    for q, s, o, u in zip(suspect_probs, served, other, units, strict=True):
        gaps.setdefault(str(u), []).append(float(q.get(str(s), 0.0)) - float(q.get(str(o), 0.0)))
    return [float(np.mean(v)) for v in gaps.values()]


def verdict(suspect_labels: Sequence[Any], served: Sequence[Any], other: Sequence[Any], units: Sequence[str],
            alpha: float = 1e-6, suspect_probs: Sequence[dict[str, float]] | None = None) -> OutputVerdict:
    """Compare a suspect's answers on the logged marked queries with the served classes, one trial per unit (labels as text).

    With `suspect_probs` (per query, class name -> probability) the score test decides, else the sign test.
    """
    votes: dict[str, list[int]] = {}
    for a, s, o, u in zip(suspect_labels, served, other, units, strict=True):
        tally = votes.setdefault(str(u), [0, 0])
        if str(a) == str(s):
            tally[0] += 1
        elif str(a) == str(o):
            tally[1] += 1
    n = sum(1 for v in votes.values() if v[0] != v[1])
    m = sum(1 for v in votes.values() if v[0] > v[1])
    p_sign = p_value(m, n)
    if suspect_probs is None:
        return OutputVerdict(matches=m, n=n, p_value=p_sign, alpha=alpha, logged=len(served), units=len(votes), p_sign=p_sign)
    p_score, weighted = score_p_value(unit_gaps(suspect_probs, served, other, units))
    return OutputVerdict(matches=m, n=n, p_value=p_score, alpha=alpha, logged=len(served), units=len(votes), test="score",
                         p_sign=p_sign, score_units=weighted)
