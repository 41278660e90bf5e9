"""Record-level DP at a site: one persistent, tamper-evident privacy ledger per site and kind, and a hard budget.

Why a ledger: a fresh PrivacyEngine per round silently restarts epsilon at zero (measured: 5 rounds
reported the round-1 value). The site keeps every mechanism it ran, (noise_multiplier, sample_rate,
steps), as hash-chained entries on disk (fedseek.privacy.ledger_chain), charges a round BEFORE it
trains (fsync'd: a crash mid-round keeps the charge), refuses any round whose projected epsilon
exceeds the budget, and holds a lock for the whole round so two concurrent rounds cannot both spend
against the same balance. A missing, cut or edited ledger raises LedgerError: never "nothing spent".
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseek.privacy.ledger_chain import (
    EVALUATION_LEDGER_FILE,
    LEDGER_FILE,
    Chain,
    LedgerBusy,
    LedgerError,
    LedgerKind,
    current_user,
    mechanism_problem,
    new_chain,
    paths_for,
    write_chain,
)
from fedseek.privacy.ledger_lock import acquire, release
from fedseek.privacy.ledger_verify import read_chain

log = logging.getLogger("fedseek.privacy")
_ANNOUNCED: set[str] = set()  # ledgers whose kept accountant was logged (once per process)

__all__ = ["EVALUATION_LEDGER_FILE", "LEDGER_FILE", "BudgetExceeded", "LedgerBusy", "LedgerError", "LedgerKind", "PrivacyLedger",
           "RoundEntry"]


class BudgetExceeded(RuntimeError):
    """The next round would push the site's epsilon past its budget: the site refuses it."""


@dataclass
class RoundEntry:
    """One charged round: what was spent and the running epsilon after it."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    time: float


def _fmt(x: float) -> str:
    """A number short where that is exact (3, 0.5) and in full otherwise, so it can be typed back."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


class PrivacyLedger:
    """A site's training or evaluation privacy ledger in its state directory (chained, fsync'd, locked per round)."""

    def __init__(self, state_dir: str | Path, *, accountant: str, delta: float, epsilon_budget: float, site: str = "",
                 kind: LedgerKind = "training", keep_accountant: bool = False) -> None:
        """Open (and verify) the ledger under `state_dir`; LedgerError if it is damaged or the policy contradicts it.

        `keep_accountant`: the policy did not name an accountant, so an existing ledger keeps the one it was started with
        (a site upgraded across a change of the default goes on with its own) and only a new ledger takes `accountant`.
        """
        self.state_dir = Path(state_dir)
        self.kind = kind
        self.paths = paths_for(self.state_dir, kind)
        self.path = self.paths.ledger
        self.accountant = accountant
        self.keep_accountant = keep_accountant
        self.delta = float(delta)
        if not (math.isfinite(float(epsilon_budget)) and float(epsilon_budget) > 0):
            raise LedgerError(f"privacy ledger {self.path}: the site policy's epsilon budget {epsilon_budget!r} is not a number > 0")
        self.policy_budget = float(epsilon_budget)
        self.site = site
        self._holder: int | None = None  # the thread holding this ledger's lock through this object
        self._chain = Chain(self.paths)
        self._adopt(read_chain(self.state_dir, kind))

    # ------------------------------------------------------------------ state
    def _adopt(self, chain: Chain) -> None:
        """Take a verified chain as this ledger's state, after checking it against the site policy."""
        if chain.header is not None:
            kept = chain.header
            if self.keep_accountant and kept["accountant"] != self.accountant:
                if str(self.path) not in _ANNOUNCED:
                    _ANNOUNCED.add(str(self.path))
                    log.info("privacy ledger %s keeps its %s accountant (the site policy names none; new ledgers use %s)",
                             self.path, kept["accountant"], self.accountant)
                self.accountant = str(kept["accountant"])
            if kept["accountant"] != self.accountant or float(kept["delta"]) != self.delta:
                raise LedgerError(
                    f"privacy ledger {self.path} was kept with accountant={kept['accountant']} delta={kept['delta']}, but the site "
                    f"policy now says accountant={self.accountant} delta={self.delta}; epsilons are not comparable "
                    "(keep the policy's accountant and delta, or use a new state dir to start over)")
            stored = chain.budget
            if stored is not None and self.policy_budget > stored:
                kind = "" if self.kind == "training" else " --kind evaluation"
                raise LedgerError(
                    f"privacy ledger {self.path}: the site policy raises the epsilon budget from {_fmt(stored)} to "
                    f"{_fmt(self.policy_budget)}; raise it explicitly with `fedseek privacy raise-budget {self.state_dir} "
                    f"--to {_fmt(self.policy_budget)} --reason TEXT{kind}`")
            self.site = self.site or str(kept["site"])
        self._chain = chain

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history [(noise, sample rate, steps), ...], rebuilt from the chained charges."""
        return self._chain.history

    @property
    def rounds(self) -> list[RoundEntry]:
        """Every charge, in order."""
        return [RoundEntry(**r) for r in self._chain.views()["rounds"]]

    @property
    def refusals(self) -> list[dict[str, Any]]:
        """Every refused round (run_id, server_round, projected_epsilon, time), in order."""
        return list(self._chain.views()["refusals"])

    @property
    def epsilon_budget(self) -> float:
        """The budget in force: the site policy's, which is never above the one the ledger records (read-only)."""
        stored = self._chain.budget
        return self.policy_budget if stored is None else min(self.policy_budget, stored)

    @property
    def stored_budget(self) -> float | None:
        """The budget the ledger records (None before its first write); the policy's may be lower until then."""
        return self._chain.budget

    @property
    def calibrated_noise(self) -> float | None:
        """The noise last calibrated over the site's own horizon (persisted as a chained entry)."""
        return self._chain.calibrated_noise

    @calibrated_noise.setter
    def calibrated_noise(self, value: float | None) -> None:
        if value is None or not (math.isfinite(float(value)) and float(value) > 0):
            raise LedgerError(f"privacy ledger {self.path}: calibrated noise {value!r} is not a number > 0")
        if value != self._chain.calibrated_noise:
            with self._writing():
                self._commit({"type": "calibration", "noise_multiplier": float(value)})

    # ------------------------------------------------------------------ lock and writes
    @contextlib.contextmanager
    def lock(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's exclusive lock for a whole round (plan, check, charge, train); LedgerBusy if another round has it.

        On entry the ledger is re-read from disk, so what this round sees includes every earlier round.
        """
        fd = acquire(self.paths.lock)
        try:
            self._adopt(read_chain(self.state_dir, self.kind))
            self._holder = threading.get_ident()
            self._sync()
            yield self
        finally:
            self._holder = None
            release(fd)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Writes happen under the lock: the caller's if this thread holds it, else taken just for this write."""
        if self._holder == threading.get_ident():
            yield
            return
        with self.lock():
            yield

    def _sync(self) -> None:
        """Record a budget the policy lowered, and repair a head or init marker a crash left behind."""
        chain = self._chain
        if chain.fresh:
            return
        if chain.budget is not None and self.policy_budget < chain.budget:
            self._commit({"type": "budget_change", "old": chain.budget, "new": self.policy_budget,
                          "reason": "lowered by the site policy", "user": current_user()})
        elif chain.head_behind or chain.unmarked:
            self._chain = write_chain(chain)

    def _commit(self, body: dict[str, Any]) -> None:
        """Append one entry, stamped now, and persist it (creating the ledger first if none exists); memory follows disk."""
        chain = self._chain
        if chain.fresh:
            chain = write_chain(new_chain(self.paths, site=self.site, accountant=self.accountant, delta=self.delta,
                                          budget=self.policy_budget))
        self._chain = write_chain(chain.extended({**body, "time": time.time()}))

    # ------------------------------------------------------------------ accounting
    def epsilon(self) -> float:
        """Epsilon spent so far (at this ledger's delta and accountant)."""
        from fedseek.privacy.accounting import epsilon_for

        return epsilon_for(self.history, self.delta, self.accountant)

    def steps(self) -> int:
        """DP-SGD steps (or releases) charged so far."""
        return sum(n for _, _, n in self.history)

    def rounds_charged(self) -> int:
        """Distinct (run, round) pairs charged: how much of the site's planning horizon is used (round 0, the statistics
        release before training, is not a training round)."""
        return len({(r.run_id, r.server_round) for r in self.rounds if r.server_round > 0})

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site WOULD reach after `steps` more steps of this mechanism."""
        from fedseek.privacy.accounting import epsilon_for

        return epsilon_for([*self.history, (float(noise_multiplier), float(sample_rate), int(steps))], self.delta, self.accountant)

    def _mechanism(self, noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, float, int]:
        why = mechanism_problem(noise_multiplier, sample_rate, steps)
        if why is not None:
            raise LedgerError(f"privacy ledger {self.path}: refusing to account a mechanism whose {why}")
        return float(noise_multiplier), float(sample_rate), int(steps)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int, *, run_id: str = "", server_round: int = 0) -> float:
        """Return the projected epsilon, or record a chained refusal and raise BudgetExceeded."""
        s, q, n = self._mechanism(noise_multiplier, sample_rate, steps)
        projected = self.projected_epsilon(s, q, n)
        if not projected <= self.epsilon_budget:  # NaN refuses too
            with self._writing():
                self._commit({"type": "refusal", "run_id": str(run_id), "server_round": int(server_round),
                              "projected_epsilon": projected if math.isfinite(projected) else "inf"})
            raise BudgetExceeded(
                f"site {self.site or '?'} refuses round {server_round}: epsilon would reach {projected:.4f} "
                f"> budget {self.epsilon_budget:g} (spent {self.epsilon():.4f}, delta {self.delta:g}, {self.accountant})")
        return projected

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, *, run_id: str, server_round: int,
               local_noise_multiplier: float | None = None) -> float:
        """Append a chained charge and fsync it before returning (call it BEFORE training); epsilon after it.

        A charge is always recorded, even past the budget (the budget is enforced by `check`): what ran is never under-counted.
        `local_noise_multiplier` (distributed DP): the noise the site's own share carries, below the accounted one (which the
        secure sum carries); `local_floor_epsilon` accounts it.
        """
        s, q, n = self._mechanism(noise_multiplier, sample_rate, steps)
        body: dict[str, Any] = {"type": "charge", "run_id": str(run_id), "server_round": int(server_round), "noise_multiplier": s,
                                "sample_rate": q, "steps": n}
        if local_noise_multiplier is not None:
            body["local_noise_multiplier"] = self._mechanism(local_noise_multiplier, q, n)[0]
        with self._writing():
            eps = self.projected_epsilon(s, q, n)
            if not math.isfinite(eps):
                raise LedgerError(f"privacy ledger {self.path}: epsilon of noise {s:g}, q {q:g}, {n} steps is not finite; "
                                  "refusing to spend it")
            self._commit({**body, "epsilon_after": eps})
        return eps

    def local_floor_epsilon(self) -> float:
        """Epsilon of the site's releases counting only its own noise (distributed-DP charges at their local share).

        What the site keeps if the coordinator and every other site colluded or the secure aggregation failed; equal to
        `epsilon()` for a ledger with local-DP charges only.
        """
        from fedseek.privacy.accounting import epsilon_for

        return epsilon_for(self._chain.floor_history, self.delta, self.accountant)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, *, run_id: str, server_round: int) -> float:
        """Deprecated name of `charge` (kept for callers written before charge-before-training)."""
        return self.charge(noise_multiplier, sample_rate, steps, run_id=run_id, server_round=server_round)

    def calibrate_noise(self, sample_rate: float, steps_per_round: int, remaining_rounds: int) -> float:
        """Smallest noise (bisection) so the remaining planned rounds fit the remaining budget."""
        from fedseek.privacy.accounting import compress_history, fit_noise

        steps = max(1, steps_per_round * max(1, remaining_rounds))
        noise = fit_noise(compress_history(self.history), float(sample_rate), steps, self.epsilon_budget, self.delta, self.accountant)
        if noise is None:
            raise BudgetExceeded(
                f"site {self.site or '?'}: even noise 50 cannot fit {remaining_rounds} more rounds in the "
                f"remaining budget (spent {self.epsilon():.4f} of {self.epsilon_budget:g})")
        return noise

    def summary(self) -> dict[str, Any]:
        """The numbers a data-protection officer reads: spent, budget, steps, rounds, refusals."""
        last = self.history[-1] if self.history else (0.0, 0.0, 0)
        return {
            "site": self.site,
            "kind": self.kind,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "epsilon_budget": self.epsilon_budget,
            "steps": self.steps(),
            "rounds": len(self.rounds),
            "refusals": len(self.refusals),
            "entries": len(self._chain.entries),
            "last_noise_multiplier": last[0],
            "last_sample_rate": last[1],
        }
