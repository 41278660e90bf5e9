"""The privacy ledger on disk: hash-chained entries, a head file and an init marker, checked on every read.

Per kind (training | evaluation), in the site's state directory:
  privacy_ledger.json | evaluation_ledger.json   header, chained entries, and summary views (checked, never trusted)
  privacy_ledger.head | evaluation_ledger.head   entry count and last hash, written after the ledger
  ledger.training.init | ledger.evaluation.init  written once, right after the ledger is created
Each entry carries `seq`, `prev` (the previous entry's hash; for the first, the genesis: the sha256 of
the header, which binds kind, accountant and delta) and `hash` = sha256 of its canonical JSON without
`hash`. What was spent is rebuilt from the chained charge entries only; an edit, a cut, a deleted
file or a replaced ledger raises LedgerError, so a site can never under-count silently.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

from fedseek.files import atomic_write_bytes

LedgerKind = Literal["training", "evaluation"]
KINDS: tuple[LedgerKind, ...] = ("training", "evaluation")
FORMAT = "fedseek-privacy-ledger"
VERSION = 2
LEDGER_FILE = "privacy_ledger.json"
EVALUATION_LEDGER_FILE = "evaluation_ledger.json"
HEADER_KEYS = ("kind", "site", "accountant", "delta", "created", "nonce")
ENTRY_TYPES = ("budget_change", "charge", "refusal", "calibration")


class LedgerError(RuntimeError):
    """The ledger is missing, damaged, tampered with or inconsistent with the site policy: the site spends nothing."""


class LedgerBusy(LedgerError):
    """Another round (thread or process) holds the ledger's lock."""


@dataclass(frozen=True)
class LedgerPaths:
    """Where one kind of ledger lives in a state directory."""

    kind: str
    ledger: Path
    head: Path
    marker: Path
    lock: Path


def paths_for(state_dir: str | Path, kind: str) -> LedgerPaths:
    """The files of the `kind` ledger in `state_dir` (ValueError for an unknown kind)."""
    if kind not in KINDS:
        raise ValueError(f"ledger kind must be one of {', '.join(KINDS)}, not {kind!r}")
    d = Path(state_dir)
    stem = "privacy_ledger" if kind == "training" else "evaluation_ledger"
    return LedgerPaths(kind, d / f"{stem}.json", d / f"{stem}.head", d / f"ledger.{kind}.init", d / f"{stem}.lock")


def canonical(obj: Any) -> bytes:
    """The bytes an entry's hash is taken over: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode()


def digest(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def current_user() -> str:
    """Who is recording a budget change (the OS user; 'unknown' where none can be determined)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def broken(paths: LedgerPaths, what: str) -> LedgerError:
    """One line: what is wrong with which ledger, and what to do about it."""
    line = " ".join(f"privacy ledger {paths.ledger} {what}".split())
    return LedgerError(f"{line}; the site spends no privacy until it is restored from backup "
                       f"(`fedseek privacy verify {paths.ledger.parent}` shows the details)")


# ---------------------------------------------------------------------------------------- values
def _num(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _positive(x: Any, *, or_zero: bool = False) -> bool:
    return _num(x) and (float(x) >= 0 if or_zero else float(x) > 0)


def _int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def mechanism_problem(noise_multiplier: Any, sample_rate: Any, steps: Any) -> str | None:
    """Why (sigma, q, steps) is not a chargeable DP-SGD mechanism, or None if it is."""
    if not _positive(noise_multiplier):
        return f"noise multiplier {noise_multiplier!r} is not a finite number > 0"
    if not (_num(sample_rate) and 0 < float(sample_rate) <= 1):
        return f"sample rate {sample_rate!r} is not in (0, 1]"
    if not (_int(steps) and int(steps) > 0):
        return f"steps {steps!r} is not an integer > 0"
    return None


def entry_problem(e: dict[str, Any]) -> str | None:
    """Why one entry's values are invalid for its type (None = valid)."""
    t = e.get("type")
    if t not in ENTRY_TYPES:
        return f"has unknown type {t!r}"
    if not _num(e.get("time")):
        return "has no valid time"
    if t in ("charge", "refusal") and not (isinstance(e.get("run_id"), str) and _int(e.get("server_round"))):
        return "has no valid run_id / server_round"
    if t == "charge":
        why = mechanism_problem(e.get("noise_multiplier"), e.get("sample_rate"), e.get("steps"))
        if why is None and "local_noise_multiplier" in e:
            why = mechanism_problem(e.get("local_noise_multiplier"), e.get("sample_rate"), e.get("steps"))
        if why is None and not _positive(e.get("epsilon_after"), or_zero=True):
            why = f"has epsilon_after {e.get('epsilon_after')!r}, not a finite number >= 0"
        return why
    if t == "refusal":
        p = e.get("projected_epsilon")
        return None if _positive(p, or_zero=True) or p == "inf" else f"has projected_epsilon {p!r}"
    if t == "budget_change":
        old, new = e.get("old"), e.get("new")
        if not (_positive(new) and (old is None or _positive(old))):
            return f"changes the budget from {old!r} to {new!r}"
        return None
    noise = e.get("noise_multiplier")  # calibration
    return None if _positive(noise) else f"calibrates noise {noise!r}"


# ---------------------------------------------------------------------------------------- the chain
@dataclass(frozen=True)
class Chain:
    """A verified ledger: header (None: none created yet), sealed entries, and what its next write must repair."""

    paths: LedgerPaths
    header: dict[str, Any] | None = None
    entries: tuple[dict[str, Any], ...] = ()
    head_behind: bool = False  # the ledger is one entry ahead of its head: a crash between the two writes
    unmarked: bool = False  # created, but the init marker is not written yet

    @property
    def fresh(self) -> bool:
        """No ledger has been created in this state directory yet."""
        return self.header is None

    @property
    def genesis(self) -> str:
        """The first entry's `prev`: the hash of the header."""
        return digest(self.header)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The entries of one type, in order."""
        return [e for e in self.entries if e["type"] == kind]

    @property
    def budget(self) -> float | None:
        """The epsilon budget in force (the last budget change), None before creation."""
        changes = self.of_type("budget_change")
        return float(changes[-1]["new"]) if changes else None

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history (noise, sample rate, steps), rebuilt from the chained charges."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.of_type("charge")]

    @property
    def floor_history(self) -> list[tuple[float, float, int]]:
        """The history with each distributed-DP charge at the noise of the site's own share (its local floor)."""
        return [(float(e.get("local_noise_multiplier", e["noise_multiplier"])), float(e["sample_rate"]), int(e["steps"]))
                for e in self.of_type("charge")]

    @property
    def calibrated_noise(self) -> float | None:
        """The noise last calibrated over the site's horizon (None if never)."""
        cal = self.of_type("calibration")
        return float(cal[-1]["noise_multiplier"]) if cal else None

    def views(self) -> dict[str, Any]:
        """Summary fields written next to the entries for readers; derived, and checked against the entries on load."""
        charges = self.of_type("charge")
        rounds = [{k: e[k] for k in ("run_id", "server_round", "noise_multiplier", "sample_rate", "steps", "epsilon_after", "time")}
                  for e in charges]
        refusals = [{k: e[k] for k in ("run_id", "server_round", "projected_epsilon", "time")} for e in self.of_type("refusal")]
        return {"epsilon": float(charges[-1]["epsilon_after"]) if charges else 0.0, "epsilon_budget": self.budget,
                "steps": sum(int(e["steps"]) for e in charges), "history": [list(h) for h in self.history],
                "rounds": rounds, "refusals": refusals, "calibrated_noise": self.calibrated_noise}

    def extended(self, body: dict[str, Any]) -> Chain:
        """This chain with one more entry, sealed: seq, prev and hash added (nothing is written)."""
        if self.header is None:
            raise ValueError("create the ledger first (new_chain)")
        entry = {**body, "seq": len(self.entries), "prev": self.entries[-1]["hash"] if self.entries else self.genesis}
        entry.pop("hash", None)
        why = entry_problem(entry)
        if why is not None:
            raise LedgerError(f"refusing to record a {entry.get('type')} entry that {why}")
        return replace(self, entries=(*self.entries, {**entry, "hash": digest(entry)}))

    def document(self) -> dict[str, Any]:
        """The ledger file's JSON object."""
        assert self.header is not None
        return {"format": FORMAT, "version": VERSION, **self.header, "genesis": self.genesis, "entries": list(self.entries),
                **self.views()}


def new_chain(paths: LedgerPaths, *, site: str, accountant: str, delta: float, budget: float) -> Chain:
    """A new ledger (not yet written): header and the initial budget entry."""
    header = {"kind": paths.kind, "site": site, "accountant": accountant, "delta": float(delta), "created": time.time(),
              "nonce": secrets.token_hex(16)}
    chain = Chain(paths, header, unmarked=True)
    return chain.extended({"type": "budget_change", "old": None, "new": float(budget), "reason": "initial budget from the site policy",
                           "user": current_user(), "time": time.time()})


def _dump(doc: dict[str, Any]) -> str:
    """The ledger as JSON with one line per key and one line per list item (entries, rounds): readable and diffable."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            items = ",\n".join("  " + json.dumps(v, allow_nan=False) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_chain(chain: Chain) -> Chain:
    """Persist (ledger, then head, then the init marker if missing), each atomically with fsync; the chain as written.

    A failed write raises LedgerError: the caller must not spend what could not be recorded.
    """
    assert chain.header is not None and chain.entries
    p = chain.paths
    head = {"genesis": chain.genesis, "entries": len(chain.entries), "last": chain.entries[-1]["hash"]}
    try:
        atomic_write_bytes(p.ledger, _dump(chain.document()).encode())
        atomic_write_bytes(p.head, (json.dumps(head) + "\n").encode())
        if chain.unmarked or not p.marker.exists():
            marker = {"kind": p.kind, "site": chain.header["site"], "genesis": chain.genesis, "created": chain.header["created"]}
            atomic_write_bytes(p.marker, (json.dumps(marker) + "\n").encode())
    except OSError as exc:
        raise LedgerError(f"privacy ledger {p.ledger} cannot be written ({exc.strerror or exc}); refusing to spend what it "
                          "cannot record") from None
    return replace(chain, head_behind=False, unmarked=False)
