"""An output watermark for a served classifier that transfers to models trained on its answers.

Scheme (DAWN-style keyed answer perturbation, Szyller et al., "DAWN: Dynamic Adversarial
Watermarking of Neural Networks", ACM MM 2021, restricted to low-margin answers): for a query
whose top-two class probabilities are within `margin` of each other, a keyed pseudo-random bit
(HMAC-SHA256 of the query's canonical bytes under a subkey of the model's watermark key) picks
which of the two classes is served, and the served probabilities put 90% of the pair's mass on
it. Other queries are answered unchanged. The server logs every marked query (the raw row, the
served class and the other one of the pair): a model trained on the answers reproduces the
served class on those queries, an independent model picks it half the time.

Why restricted to low margins: a flipped answer costs accuracy only when the original answer was
right and the runner-up wrong; near a tie that happens about as often as the reverse, so the
expected accuracy cost per marked query is about half the margin (for a calibrated model), and
DAWN's uniform marking (a random wrong label on a keyed share of all queries) costs its full
share. Detection is black-box: query the suspect on the logged marked rows.

Test: on the logged queries where the suspect answers one of the pair (n of them), count the m
where it answers the served class; the p-value is P(Binomial(n, 1/2) >= m). For any suspect that
does not know the key it is exact: the keyed bit is a PRF output independent of the suspect, so
given that the suspect answers one of the two classes it matches the served one with
probability exactly 1/2, independently across distinct queries (queries where it answers a third
class carry no information and are left out, which keeps the null exact rather than conservative).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEME = "fedseek-output-wm-v1"
SHARE = 0.9  # of the top-two probability mass served for the keyed class of a marked query
DEFAULT_MARGIN = 0.15


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
    return hmac.new(bytes.fromhex(seed_hex), SCHEME.encode(), hashlib.sha256).digest()


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


def keyed_bit(subkey: bytes, row: Sequence[Any]) -> int:
    """The PRF bit that picks the served class of a marked query."""
    return hmac.new(subkey, canonical(row), hashlib.sha256).digest()[0] & 1


@dataclass(frozen=True)
class Marked:
    """What the watermark did to a batch: served probabilities, served classes and which rows were marked."""

    probs: np.ndarray
    labels: np.ndarray
    marked: np.ndarray  # bool per row
    other: np.ndarray  # per row: the other class of the top-two pair (meaningful where marked)


def mark(probs: np.ndarray, rows: Sequence[Sequence[Any]], subkey: bytes, margin: float = DEFAULT_MARGIN) -> Marked:
    """Apply the watermark to one batch of class probabilities (rows: the raw query rows, in the model card's column order)."""
    p = np.asarray(probs, dtype=np.float64)
    out, labels = p.copy(), p.argmax(1)
    if p.shape[1] < 2:
        return Marked(out, labels, np.zeros(len(p), dtype=bool), labels.copy())
    order = np.argsort(-p, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    rows_idx = np.arange(len(p))
    marked = (p[rows_idx, top] - p[rows_idx, second]) <= margin
    other = second.copy()
    for i in np.flatnonzero(marked):
        a, b = (int(second[i]), int(top[i])) if keyed_bit(subkey, rows[int(i)]) else (int(top[i]), int(second[i]))
        mass = p[i, a] + p[i, b]
        out[i, a], out[i, b] = mass * SHARE, mass * (1.0 - SHARE)
        labels[i], other[i] = a, b
    return Marked(out, labels, marked, other)


def entry_tag(subkey: bytes, row: Sequence[Any], served: str, other: str) -> str:
    """An entry's authentication tag: HMAC of the row and the pair (a log cannot be edited or extended without the key)."""
    return hmac.new(subkey, canonical(row) + b"|" + json.dumps([served, other]).encode(), hashlib.sha256).hexdigest()


class MarkLog:
    """The server's log of marked queries (JSON lines: time, raw row, served class, tag); appended, flushed, thread-safe.

    It holds what people asked (raw feature rows): keep it as confidential as the model's key.
    """

    def __init__(self, path: str | Path, columns: list[str], subkey: bytes) -> None:
        self.path, self.columns, self._subkey = Path(path), list(columns), subkey
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if not self.path.exists():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"scheme": SCHEME, "columns": self.columns}) + "\n")

    def append(self, rows: Sequence[Sequence[Any]], labels: Sequence[str], others: Sequence[str]) -> None:
        """Record marked queries (rows in the model card's column order; served class and the other of the pair, by name)."""
        if not len(rows):
            return
        now = time.time()
        lines = "".join(json.dumps({"time": now, "row": [_jsonable(v) for v in r], "served": str(c), "other": str(o),
                                    "tag": entry_tag(self._subkey, r, str(c), str(o))}) + "\n"
                        for r, c, o in zip(rows, labels, others, strict=True))
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


@dataclass(frozen=True)
class LoggedMarks:
    """A mark log as read back: the columns, the marked rows and the classes served for them."""

    columns: list[str]
    rows: list[list[Any]]
    served: list[str]
    other: list[str]


def read_log(path: str | Path, subkey: bytes) -> LoggedMarks:
    """The logged marked queries, every entry's tag checked against the key (ValueError naming the file and line)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read the mark log ({exc.strerror or exc})") from None
    columns: list[str] | None = None
    rows: list[list[Any]] = []
    served: list[str] = []
    others: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if columns is None:
                if rec.get("scheme") != SCHEME:
                    raise ValueError
                columns = [str(c) for c in rec["columns"]]
                continue
            row, label, other, tag = list(rec["row"]), str(rec["served"]), str(rec["other"]), str(rec["tag"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{p}: line {i} is not a {SCHEME} mark-log record") from None
        if not hmac.compare_digest(tag, entry_tag(subkey, row, label, other)):
            raise ValueError(f"{p}: line {i}: its tag does not match this key (another key's log, or an edited entry)")
        rows.append(row)
        served.append(label)
        others.append(other)
    if columns is None:
        raise ValueError(f"{p}: empty mark log")
    return LoggedMarks(columns, rows, served, others)


@dataclass(frozen=True)
class OutputVerdict:
    """The result of testing a suspect on the logged marked queries."""

    matches: int
    n: int  # logged queries on which the suspect answered one of the pair (the test's trials)
    p_value: float
    alpha: float
    logged: int = 0  # every logged marked query

    @property
    def detected(self) -> bool:
        """True when the suspect reproduces the keyed answers beyond chance at level alpha."""
        return self.n > 0 and self.p_value <= self.alpha

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"scheme": SCHEME, "matches": self.matches, "n": self.n, "logged": self.logged, "p_value": self.p_value,
                "alpha": self.alpha, "detected": self.detected,
                "null": "Binomial(n, 1/2) upper tail over the logged queries answered with one of the pair (exact)"}


def p_value(matches: int, n: int) -> float:
    """P(Binomial(n, 1/2) >= matches): the exact p-value of `matches` agreements on n marked queries."""
    from scipy.stats import binom

    return float(binom.sf(matches - 1, n, 0.5)) if n else 1.0


def verdict(suspect_labels: Sequence[Any], served: Sequence[Any], other: Sequence[Any], alpha: float = 1e-6) -> OutputVerdict:
    """Compare a suspect's answers on the logged marked queries with the served classes (labels compared as text)."""
    n = m = 0
    for a, s, o in zip(suspect_labels, served, other, strict=True):
        if str(a) in (str(s), str(o)):
            n += 1
            m += str(a) == str(s)
    return OutputVerdict(matches=m, n=n, p_value=p_value(m, n), alpha=alpha, logged=len(served))
