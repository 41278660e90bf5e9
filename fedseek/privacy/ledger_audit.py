"""A site's ledgers checked and amended from outside the site: independent recomputation, and explicit budget raises.

`audit` re-reads a ledger without any site policy, verifies marker, head, chain and entries, and
recomputes epsilon from the chained charges with a fresh Opacus accountant (not the cached one the
site used), so a ledger whose stored epsilon does not follow from its entries is caught.
`raise_budget` is the only way a budget goes up: a chained, attributed budget_change entry.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedseek.privacy.ledger_chain import LedgerError, current_user, paths_for, write_chain
from fedseek.privacy.ledger_lock import exclusive
from fedseek.privacy.ledger_verify import read_chain

# Relative tolerance (of max(1, epsilon)) between the stored and recomputed epsilon. RDP composes
# additively (equal up to rounding); PRV's answer is itself only within eps_error = 0.01 and its
# discretisation moves with how the history is grouped.
TOLERANCE = {"rdp": 1e-9, "prv": 1e-2}


@dataclass
class Audit:
    """The outcome of checking one ledger: counts, both epsilons, budget, and a status (absent, intact, broken, mismatch)."""

    kind: str
    path: Path
    site: str = ""
    accountant: str = ""
    delta: float = 0.0
    entries: int = 0
    steps: int = 0
    epsilon_recomputed: float | None = None
    epsilon_stored: float | None = None
    budget: float | None = None
    status: str = "absent"
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Nothing wrong: the ledger is intact (or was never created)."""
        return self.status in ("absent", "intact")


def recompute_epsilon(history: list[tuple[float, float, int]], accountant: str, delta: float) -> float:
    """Epsilon of `history` from a fresh Opacus accountant, entry by entry (no cache, no merging)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def audit(state_dir: str | Path, kind: str) -> Audit:
    """Check the `kind` ledger in `state_dir` without trusting it or any site policy."""
    result = Audit(kind, paths_for(state_dir, kind).ledger)
    try:
        chain = read_chain(state_dir, kind)
    except LedgerError as exc:
        result.status, result.detail = "broken", str(exc)
        return result
    if chain.header is None:
        return result
    views = chain.views()
    result.site, result.accountant, result.delta = chain.header["site"], chain.header["accountant"], float(chain.header["delta"])
    result.entries, result.steps, result.budget = len(chain.entries), int(views["steps"]), chain.budget
    result.epsilon_stored = float(views["epsilon"])
    try:
        result.epsilon_recomputed = recomputed = recompute_epsilon(chain.history, result.accountant, result.delta)
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. an accountant name Opacus does not know
        result.status, result.detail = "broken", f"{result.path}: epsilon cannot be recomputed ({exc})"
        return result
    stored = result.epsilon_stored
    if not abs(recomputed - stored) <= TOLERANCE.get(result.accountant, 1e-9) * max(1.0, abs(stored)):
        side = "UNDER-counted" if not recomputed <= stored else "over-counted"
        result.status = "mismatch"
        result.detail = (f"{result.path}: stored epsilon {stored:.6g} but its charges give {recomputed:.6g} ({side}); "
                         "restore it from backup")
        return result
    result.status = "intact"
    notes = []
    if result.budget is not None and stored > result.budget:
        notes.append(f"spent {stored:.4g} exceeds the budget {result.budget:g}")
    if chain.head_behind or chain.unmarked:
        notes.append("a crash between two writes left the head or init marker behind; the site repairs it on its next round")
    result.detail = "; ".join(notes)
    return result


def raise_budget(state_dir: str | Path, kind: str, to: float, *, reason: str) -> tuple[float, float]:
    """Raise the ledger's epsilon budget to `to` with a chained, attributed entry (under the ledger lock); (old, new).

    ValueError if `to` is not above the current budget or `reason` is empty; LedgerError if the ledger is absent,
    damaged, or a round holds its lock.
    """
    if not (math.isfinite(to) and to > 0):
        raise ValueError(f"--to {to!r} is not a number > 0")
    if not reason.strip():
        raise ValueError("--reason must say why the budget is raised (it is recorded in the ledger)")
    paths = paths_for(state_dir, kind)
    with exclusive(paths.lock):
        chain = read_chain(state_dir, kind)
        old = chain.budget
        if old is None:
            raise LedgerError(f"no {kind} ledger in {Path(state_dir)}: a new ledger starts with the site policy's budget")
        if not to > old:
            raise ValueError(f"--to {to:g} does not raise the budget (it is {old:g}); lower a budget in the site policy instead")
        write_chain(chain.extended({"type": "budget_change", "old": old, "new": float(to), "reason": reason.strip(),
                                    "user": current_user(), "time": time.time()}))
    return old, float(to)
