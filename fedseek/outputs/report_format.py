"""Text for the report: numbers, byte counts, durations and run-supplied text made printable, and the table of such cells.

Everything here returns plain text; HTML escaping is the template's job (Jinja2 autoescape).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_UNDERLINE = re.compile(r"[\^~]{3,}")  # traceback underline markers
_SPACES = re.compile(r"\s+")
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")


@dataclass(frozen=True)
class Table:
    """Headers and rows of text cells; `cls` is the CSS class."""

    headers: list[str]
    rows: list[list[str]]
    cls: str = ""


def num(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, a string, a bool)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def clean(text: Any, limit: int = 400) -> str:
    """Printable one-paragraph text: ANSI colour codes and control characters removed, shortened."""
    s = _CTRL.sub(" ", _ANSI.sub("", str(text)))
    s = _SPACES.sub(" ", _UNDERLINE.sub(" ", s)).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell or card: integers with thousands separators, floats to `digits`."""
    v = num(x)
    if v is None:
        return "—" if x is None else str(x)
    if v == int(v) and abs(v) < 1e15 and not isinstance(x, float):
        return f"{int(v):,}"
    if v != 0 and (abs(v) < 10**-digits or abs(v) >= 1e7):
        return f"{v:.{max(1, digits - 1)}e}"
    return f"{v:.{digits}f}"


def fmt_bytes(x: Any) -> str:
    """A byte count in B / kB / MB / GB (decimal units)."""
    v = num(x)
    if v is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {unit}"
    return f"{int(v)} B"


def fmt_seconds(x: Any) -> str:
    """A duration: seconds under two minutes, minutes and seconds above."""
    v = num(x)
    if v is None:
        return "—"
    if v < 120:
        return f"{v:.1f} s"
    return f"{int(v // 60)} min {v % 60:.0f} s"


def mpl_text(text: Any) -> str:
    """Text for a matplotlib label: a '$' in a site name must not start mathtext."""
    return str(text).replace("$", r"\$")
