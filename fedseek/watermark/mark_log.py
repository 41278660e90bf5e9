"""The output watermark's mark log: one JSON line per marked answer, each tagged with an HMAC under the key.

The server appends (thread-safe, flushed); `verify-outputs` reads it back and refuses any line
whose tag does not match, so the log cannot be edited or extended without the key. It holds what
people asked (raw rows): keep it as confidential as the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.watermark.outputs import SCHEME, SCHEME_V1, CellSpec, canonical


def entry_tag(subkey: bytes, row: Sequence[Any], served: str, other: str, unit: str | None = None) -> str:
    """An entry's authentication tag: HMAC of the row, the pair and the unit (a log cannot be edited or extended without the key)."""
    fields = [served, other] if unit is None else [served, other, unit]
    return hmac.new(subkey, canonical(row) + b"|" + json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def log_header(path: Path) -> tuple[str, list[str]] | None:
    """A mark log's scheme and columns from its first line; None when the file cannot be read or is not a mark log."""
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
        return str(head["scheme"]), [str(c) for c in head["columns"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class MarkLogError(ValueError):
    """A mark log that cannot be appended to (another scheme's log): one line."""


class MarkLog:
    """The server's log of marked queries (JSON lines: time, raw row, served class, other class, unit, tag); thread-safe.

    It holds what people asked (raw feature rows): keep it as confidential as the model's key.
    """

    def __init__(self, path: str | Path, columns: list[str], subkey: bytes, spec: CellSpec | None = None) -> None:
        self.path, self.columns, self._subkey = Path(path), list(columns), subkey
        self.spec = spec or CellSpec()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size:
            head = log_header(self.path)
            if head is None:
                raise MarkLogError(f"{self.path}: exists and is not a mark log (give --mark-log a new file)")
            scheme, cols = head
            if scheme != SCHEME:
                raise MarkLogError(f"{self.path}: a {scheme} log (an earlier scheme; it stays verifiable): give --mark-log a new file")
            if list(cols) != self.columns:
                raise MarkLogError(f"{self.path}: a log for the columns {list(cols)[:6]}, this model has {self.columns[:6]}: "
                                   "give --mark-log a new file")
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"scheme": SCHEME, "columns": self.columns,
                                    "cells": {"planes": self.spec.planes, "width": self.spec.width}}) + "\n")

    def append(self, rows: Sequence[Sequence[Any]], labels: Sequence[str], others: Sequence[str], units: Sequence[str]) -> None:
        """Record marked queries (rows in the model card's column order; served class and the other of the pair, by name; unit)."""
        if not len(rows):
            return
        now = time.time()
        lines = "".join(json.dumps({"time": now, "row": [_jsonable(v) for v in r], "served": str(c), "other": str(o), "unit": u,
                                    "tag": entry_tag(self._subkey, r, str(c), str(o), u)}) + "\n"
                        for r, c, o, u in zip(rows, labels, others, units, strict=True))
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
    """A mark log as read back: the columns, the marked rows, the classes served for them and their units."""

    columns: list[str]
    rows: list[list[Any]]
    served: list[str]
    other: list[str]
    units: list[str]
    scheme: str = SCHEME


def read_log(path: str | Path, subkey: bytes) -> LoggedMarks:
    """The logged marked queries, every entry's tag checked against the key (ValueError naming the file and line).

    A log of the earlier per-query scheme (v1) is read with one unit per distinct row (its bit was a
    PRF of the row, so repeats of a row share one coin).
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read the mark log ({exc.strerror or exc})") from None
    columns: list[str] | None = None
    scheme = SCHEME
    rows: list[list[Any]] = []
    served: list[str] = []
    others: list[str] = []
    units: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if columns is None:
                if rec.get("scheme") not in (SCHEME, SCHEME_V1):
                    raise ValueError
                scheme, columns = rec["scheme"], [str(c) for c in rec["columns"]]
                continue
            row, label, other, tag = list(rec["row"]), str(rec["served"]), str(rec["other"]), str(rec["tag"])
            unit = str(rec["unit"]) if scheme == SCHEME else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{p}: line {i} is not a {SCHEME} or {SCHEME_V1} mark-log record") from None
        if not hmac.compare_digest(tag, entry_tag(subkey, row, label, other, unit)):
            raise ValueError(f"{p}: line {i}: its tag does not match this key (another key's log, or an edited entry)")
        rows.append(row)
        served.append(label)
        others.append(other)
        units.append(unit if unit is not None else "row:" + canonical(row).decode())
    if columns is None:
        raise ValueError(f"{p}: empty mark log")
    return LoggedMarks(columns, rows, served, others, units, scheme)
