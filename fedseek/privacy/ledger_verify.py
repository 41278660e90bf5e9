"""Reading a privacy ledger without trusting it: a consistent snapshot, then header, chain, entries, head, marker and views.

Writers (under the ledger's lock) write the ledger, then its head, then (once) the init marker, so a
reader that sees the same head and marker before and after reading the ledger holds a consistent
snapshot: the ledger equals its head or is one entry ahead (a crash between the two writes).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedseek.privacy.ledger_chain import (
    FORMAT,
    HEADER_KEYS,
    VERSION,
    Chain,
    LedgerBusy,
    LedgerError,
    LedgerPaths,
    broken,
    canonical,
    digest,
    entry_problem,
    new_chain,
    paths_for,
)


def read_chain(state_dir: str | Path, kind: str) -> Chain:
    """The verified `kind` ledger of `state_dir` (an empty, fresh Chain if none was ever created); LedgerError if not intact."""
    paths = paths_for(state_dir, kind)
    head_raw, ledger_raw, marker_raw = _snapshot(paths)
    head = _small_json(paths, paths.head, head_raw)
    marker = _small_json(paths, paths.marker, marker_raw)
    if ledger_raw is None:
        if head is None and marker is None:
            return Chain(paths)
        evidence = f"its init marker {paths.marker.name}" if marker is not None else f"its head file {paths.head.name}"
        raise broken(paths, f"is missing, but {evidence} shows it was created (deleted?)")
    try:
        doc = json.loads(ledger_raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise broken(paths, f"is unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise broken(paths, "is unreadable (not a JSON object)")
    if doc.get("format") != FORMAT:
        if head is None and marker is None and "history" in doc and doc.get("version", 1) == 1:
            return from_v1(paths, doc)
        raise broken(paths, f"is not a chained fedseek privacy ledger (format {doc.get('format')!r})")
    return _check_head(_check_document(paths, doc), head, marker)


def _read(paths: LedgerPaths, path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise broken(paths, f"cannot be read: {path.name}: {exc.strerror}") from None


def _snapshot(paths: LedgerPaths) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(head, ledger, marker) bytes, read so that no write completed in between (retried while a writer is active)."""
    for _ in range(100):
        m1, h1 = _read(paths, paths.marker), _read(paths, paths.head)
        ledger = _read(paths, paths.ledger)
        if _read(paths, paths.head) == h1 and _read(paths, paths.marker) == m1:
            return h1, ledger, m1
        time.sleep(0.01)
    raise LedgerBusy(f"privacy ledger {paths.ledger} kept changing while it was read: another round is in progress at this site")


def _small_json(paths: LedgerPaths, path: Path, raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise broken(paths, f"cannot be checked: {path.name} is unreadable")
    return obj


def _check_document(paths: LedgerPaths, doc: dict[str, Any]) -> Chain:
    """Header, genesis, every entry's validity and link, and the summary views against the entries."""
    if doc.get("version") != VERSION:
        raise broken(paths, f"has format version {doc.get('version')!r}; this fedseek reads version {VERSION}")
    header = {k: doc.get(k) for k in HEADER_KEYS}
    if header["kind"] != paths.kind:
        raise broken(paths, f"is a {header['kind']!r} ledger, not a {paths.kind} ledger")
    delta = header["delta"]
    if not (all(isinstance(header[k], str) for k in ("site", "accountant", "nonce")) and isinstance(delta, float)
            and 0 < delta < 1 and isinstance(header["created"], int | float)):
        raise broken(paths, "has an invalid header (site, accountant, delta, created, nonce)")
    if doc.get("genesis") != digest(header):
        raise broken(paths, "has an edited header (site, accountant, delta or creation time): its genesis hash does not match")
    entries = doc.get("entries")
    if not isinstance(entries, list) or not entries:
        raise broken(paths, "has no entries")
    prev = digest(header)
    for i, entry in enumerate(entries):
        _check_entry(paths, entry, i, prev)
        prev = entry["hash"]
    first = entries[0]
    if first["type"] != "budget_change" or first.get("old") is not None:
        raise broken(paths, "does not start with its initial budget")
    chain = Chain(paths, header, tuple(entries))
    for key, value in chain.views().items():
        if _canonical_or_none(doc.get(key)) != canonical(value):
            raise broken(paths, f"has a summary field {key!r} that disagrees with its chained entries (edited by hand?)")
    return chain


def _canonical_or_none(obj: Any) -> bytes | None:
    try:
        return canonical(obj)
    except ValueError:  # NaN / Infinity
        return None


def _check_entry(paths: LedgerPaths, e: Any, i: int, prev: str) -> None:
    if not isinstance(e, dict):
        raise broken(paths, f"entry {i} is not an object")
    what = f"entry {i} ({e.get('type')}" + (f", round {e.get('server_round')})" if "server_round" in e else ")")
    why = entry_problem(e)
    if why is not None:
        raise broken(paths, f"{what} is invalid: it {why}")
    if e.get("seq") != i or isinstance(e.get("seq"), bool) or e.get("prev") != prev:
        raise broken(paths, f"{what} does not follow entry {i - 1}: the hash chain is broken (entries removed, inserted or reordered)")
    body = {k: v for k, v in e.items() if k != "hash"}
    if _canonical_or_none(body) is None or e.get("hash") != digest(body):
        raise broken(paths, f"{what} was modified: its hash does not match its contents")


def _check_head(chain: Chain, head: dict[str, Any] | None, marker: dict[str, Any] | None) -> Chain:
    """The head file and init marker against the chain: detects truncation, replacement and deletion."""
    paths, n = chain.paths, len(chain.entries)
    if marker is not None and marker.get("genesis") != chain.genesis:
        raise broken(paths, f"is not the ledger created here (its init marker {paths.marker.name} names another): it was replaced")
    creation_only = all(e["seq"] == 0 or e.get("migrated") is True for e in chain.entries)
    if head is None:
        if marker is not None:
            raise broken(paths, f"has lost its head file {paths.head.name} (deleted?), so truncation cannot be ruled out")
        if not creation_only:
            raise broken(paths, f"has {n} entries but neither its head file nor its init marker exists (deleted?)")
        return replace(chain, head_behind=True, unmarked=True)  # a crash while the ledger was being created
    m, last = head.get("entries"), head.get("last")
    if head.get("genesis") != chain.genesis or not isinstance(m, int) or m < 1:
        raise broken(paths, f"does not match its head file {paths.head.name}: it was replaced")
    if m == n and last == chain.entries[-1]["hash"]:
        behind = False
    elif n == m + 1 and chain.entries[m - 1]["hash"] == last:
        behind = True  # a crash between writing the ledger and its head: repaired on the next write
    elif n < m:
        raise broken(paths, f"has {n} entries but its head file records {m}: entries were removed from its end (truncated)")
    else:
        raise broken(paths, f"has {n} entries that do not match its head file ({m} entries ending in {str(last)[:12]})")
    if marker is None and not creation_only:
        raise broken(paths, f"has lost its init marker {paths.marker.name} (deleted?)")
    return replace(chain, head_behind=behind, unmarked=marker is None)


def from_v1(paths: LedgerPaths, doc: dict[str, Any]) -> Chain:
    """A format-1 ledger (before the hash chain) as a chain of migrated entries; written as format 2 on the next write."""
    from fedseek.privacy.accounting import epsilon_for

    try:
        accountant, delta, budget = str(doc["accountant"]), float(doc["delta"]), float(doc["epsilon_budget"])
        history = [(float(s), float(q), int(n)) for s, q, n in doc.get("history", [])]
        rounds = [r for r in doc.get("rounds", []) if int(r.get("steps", 0)) > 0]
        if len(rounds) != len(history):
            rounds = [{} for _ in history]
        chain = new_chain(paths, site=str(doc.get("site") or ""), accountant=accountant, delta=delta, budget=budget)
        for i, ((s, q, n), r) in enumerate(zip(history, rounds, strict=True)):
            chain = chain.extended({"type": "charge", "run_id": str(r.get("run_id", "")), "server_round": int(r.get("server_round", 0)),
                                    "noise_multiplier": s, "sample_rate": q, "steps": n, "time": float(r.get("time", 0.0)),
                                    "epsilon_after": epsilon_for(history[: i + 1], delta, accountant), "migrated": True})
        for r in doc.get("refusals", []):
            p = float(r.get("projected_epsilon", math.inf))
            chain = chain.extended({"type": "refusal", "run_id": str(r.get("run_id", "")), "server_round": int(r.get("server_round", 0)),
                                    "projected_epsilon": p if math.isfinite(p) else "inf", "time": float(r.get("time", 0.0)),
                                    "migrated": True})
        if doc.get("calibrated_noise") is not None:
            chain = chain.extended({"type": "calibration", "noise_multiplier": float(doc["calibrated_noise"]), "time": time.time(),
                                    "migrated": True})
    except (KeyError, TypeError, ValueError, AttributeError, LedgerError) as exc:
        raise broken(paths, f"is a format-1 ledger that cannot be migrated ({exc})") from None
    return replace(chain, head_behind=True)
