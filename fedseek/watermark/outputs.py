"""An output watermark for a served classifier that transfers to models trained on its answers.

Scheme (DAWN-style keyed answer perturbation, Szyller et al., "DAWN: Dynamic Adversarial
Watermarking of Neural Networks", ACM MM 2021, restricted to low-margin answers and made
locality-sensitive): for a query whose top-two class probabilities are within `margin` of each
other, a keyed pseudo-random bit picks which of the two classes is served, and the served
probabilities put 90% of the pair's mass on it. Other queries are answered unchanged. The bit
is a PRF (HMAC-SHA256 under a subkey of the model's watermark key) of the query's **cell**, a
keyed locality-sensitive hash of the model's feature vector (random projections quantised at a
fixed width, E2LSH), and of the pair: identical queries, and often queries close to each other
(a row and its jittered copies), get the same choice, so a model trained on the answers sees one
consistent keyed label per neighbourhood more often than contradictory ones, and a repeated
query is one trial of the test, not several. The server logs every marked query (the raw row,
the served class, the other one of the pair and its unit, the digest of cell and pair).

Why restricted to low margins: a flipped answer costs accuracy only when the original answer was
right and the runner-up wrong; near a tie that happens about as often as the reverse, so the
expected accuracy cost per marked query is about half the margin (for a calibrated model), and
DAWN's uniform marking (a random wrong label on a keyed share of all queries) costs its full
share. Detection is black-box: query the suspect on the logged marked rows.

Test: group the logged queries by unit; in each unit take the suspect's majority among its
answers that are one of the pair (units without a strict majority are left out); count the m of
the n units whose majority is the served class; the p-value is P(Binomial(n, 1/2) >= m). For any
suspect that does not know the key it is exact: which queries are marked depends on the served
model only, the units on a subkey, and each unit's served class on a PRF bit independent of both
and of the suspect's answers, so a unit's majority matches it with probability exactly 1/2,
independently across units (queries in one unit share one coin, hence one trial per unit).
When the suspect gives class probabilities (a model file, or an endpoint that returns them) a
more powerful test of the same null decides: each unit's weight is the suspect's mean gap
between the pair's probabilities, its sign says whether the served class is ahead, and the
p-value is the exact sign-flip (fair subset sum) tail of the weights. The tests are in
fedseek.watermark.output_verdict, the log in fedseek.watermark.mark_log.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEME = "fedseek-output-wm-v2"
SCHEME_V1 = "fedseek-output-wm-v1"  # logs of the earlier per-query scheme stay verifiable (one unit per distinct row)
SHARE = 0.9  # of the top-two probability mass served for the keyed class of a marked query
DEFAULT_MARGIN = 0.15
CELL_PLANES = 6
DEFAULT_CELL_WIDTH = 0.7  # in units of the model's (scaled) features: projections are normalised by sqrt(dimension)


@dataclass(frozen=True)
class CellSpec:
    """The locality-sensitive cells: `planes` keyed random projections of the feature vector, each quantised at `width`.

    A projection is a Gaussian direction scaled by 1/sqrt(d), so for standardised features two rows
    whose features differ by delta (root mean square) land in different slabs of one projection with
    probability about 0.8 * delta / width: at the default width a copy with 0.1 standard deviations
    of jitter stays in its row's slab of each projection about 9 times in 10, in its row's cell
    (all 6) about half the time; distinct rows (delta around 1) are split.
    """

    planes: int = CELL_PLANES
    width: float = DEFAULT_CELL_WIDTH

    def __post_init__(self) -> None:
        if self.planes < 1 or not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"cells: planes must be >= 1 and width > 0 (got {self.planes}, {self.width})")

    def cells(self, subkey: bytes, features: np.ndarray) -> np.ndarray:
        """The cell coordinates (n x planes integers) of each feature row under this key."""
        x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        w, offset = _projections(subkey, x.shape[1], self.planes, self.width)
        return np.floor((np.nan_to_num(x) @ w + offset) / self.width).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _projections(subkey: bytes, d: int, planes: int, width: float) -> tuple[np.ndarray, np.ndarray]:
    """The keyed projection directions (d x planes, scaled by 1/sqrt(d)) and offsets in [0, width): drawn from the key."""
    seed = hmac.new(subkey, f"cells|{d}|{planes}|{width!r}".encode(), hashlib.sha256).digest()
    g = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
    w = g.normal(0.0, 1.0, (d, planes)) / math.sqrt(max(d, 1))
    w.flags.writeable = False
    offset = g.uniform(0.0, width, planes)
    offset.flags.writeable = False
    return w, offset


@dataclass(frozen=True)
class MarginChoice:
    """The margin that keeps the expected accuracy cost of marking within a budget, on a labelled table."""

    margin: float
    expected_drop_points: float  # expected over keys: half of (top-1 hits - top-2 hits) on the marked rows, in points
    marked_share: float  # share of the table's rows that would be marked
    rows: int


def margin_for_cost(probs: np.ndarray, y: np.ndarray, cost_points: float) -> MarginChoice:
    """The largest margin whose expected accuracy cost on (probs, y) is at most `cost_points`.

    Marking the rows with margin <= m costs, in expectation over keys, half the difference between
    top-1 and top-2 hits on them (a marked row serves each of the two with probability 1/2).
    """
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    if n == 0 or p.shape[1] < 2:
        return MarginChoice(0.0, 0.0, 0.0, n)
    order = np.argsort(-p, axis=1, kind="stable")
    idx = np.arange(n)
    margins = p[idx, order[:, 0]] - p[idx, order[:, 1]]
    cost = 0.5 * ((order[:, 0] == y).astype(float) - (order[:, 1] == y).astype(float)) / n * 100.0
    by = np.argsort(margins, kind="stable")
    cum = np.cumsum(cost[by])
    ok = np.flatnonzero(cum <= cost_points + 1e-12)
    if not len(ok):
        return MarginChoice(0.0, 0.0, 0.0, n)
    k = int(ok[-1])
    upper = float(margins[by[k + 1]]) if k + 1 < n else 1.0
    margin = (float(margins[by[k]]) + upper) / 2.0 if upper > margins[by[k]] else float(margins[by[k]])
    return MarginChoice(margin=margin, expected_drop_points=float(cum[k]), marked_share=(k + 1) / n, rows=n)


def output_subkey(seed_hex: str) -> bytes:
    """The output watermark's key, derived from the model's watermark key seed (one key file for both marks)."""
    return hmac.new(bytes.fromhex(seed_hex), SCHEME_V1.encode(), hashlib.sha256).digest()


def canonical(row: Sequence[Any]) -> bytes:
    """A row's canonical bytes: values as text (numbers rounded to 6 significant digits), JSON in column order."""
    out = []
    for v in row:
        if isinstance(v, (bool, np.bool_)):
            out.append(str(bool(v)))
        elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
            out.append(f"{float(v):.6g}")
        else:
            out.append(str(v))
    return json.dumps(out, separators=(",", ":")).encode()


def unit_and_bit(subkey: bytes, cell: np.ndarray, pair: tuple[int, int], spec: CellSpec) -> tuple[str, int]:
    """A marked query's unit (a digest of its cell and class pair) and the PRF bit that picks its served class."""
    msg = f"unit|{spec.planes}|{spec.width!r}|{pair[0]},{pair[1]}|".encode() + np.asarray(cell, dtype="<i8").tobytes()
    digest = hmac.new(subkey, msg, hashlib.sha256).digest()
    return digest[:12].hex(), digest[12] & 1


@dataclass(frozen=True)
class Marked:
    """What the watermark did to a batch: served probabilities, served classes and which rows were marked."""

    probs: np.ndarray
    labels: np.ndarray
    marked: np.ndarray  # bool per row
    other: np.ndarray  # per row: the other class of the top-two pair (meaningful where marked)
    units: list[str]  # per row: the marked query's unit ("" where not marked)


def mark(probs: np.ndarray, features: np.ndarray, subkey: bytes, margin: float = DEFAULT_MARGIN,
         spec: CellSpec | None = None) -> Marked:
    """Apply the watermark to one batch of class probabilities (features: the model's input rows, after the card's scaling).

    A marked query serves the higher-numbered class of its pair when its unit's bit is 1 and the
    lower-numbered one otherwise, so every marked query of a unit gets the same class.
    """
    spec = spec or CellSpec()
    p = np.asarray(probs, dtype=np.float64)
    out, labels = p.copy(), p.argmax(1)
    units = [""] * len(p)
    if p.shape[1] < 2 or not len(p):
        return Marked(out, labels, np.zeros(len(p), dtype=bool), labels.copy(), units)
    order = np.argsort(-p, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    rows_idx = np.arange(len(p))
    marked = (p[rows_idx, top] - p[rows_idx, second]) <= margin
    other = second.copy()
    chosen = np.flatnonzero(marked)
    if len(chosen):
        cells = spec.cells(subkey, np.asarray(features)[chosen])
        for i, cell in zip(chosen, cells, strict=True):
            lo, hi = sorted((int(top[i]), int(second[i])))
            unit, bit = unit_and_bit(subkey, cell, (lo, hi), spec)
            a, b = (hi, lo) if bit else (lo, hi)
            mass = p[i, a] + p[i, b]
            out[i, a], out[i, b] = mass * SHARE, mass * (1.0 - SHARE)
            labels[i], other[i], units[int(i)] = a, b, unit
    return Marked(out, labels, marked, other, units)
