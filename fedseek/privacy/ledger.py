"""Record-level DP at a site: one persistent Opacus accountant per site and a hard budget.

Why a ledger: a fresh PrivacyEngine per round silently restarts epsilon at zero (measured:
5 rounds reported the round-1 value). The site therefore keeps the accountant's history
[(noise_multiplier, sample_rate, steps), ...] on disk, written atomically, restores it on
every round and after restarts, and refuses any round whose *projected* epsilon exceeds
the budget, so the budget is never exceeded, not even by one step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseek.files import atomic_write_bytes
from fedseek.privacy.accounting import compress_history, epsilon_for, fit_noise

LEDGER_FILE = "privacy_ledger.json"


LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """The next round would push the site's epsilon past its budget: the site refuses it."""


@dataclass
class RoundEntry:
    """One accounted round: what was spent and the running epsilon after it."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    time: float


class PrivacyLedger:
    """A site's privacy ledger in STATE_DIR/privacy_ledger.json (atomic writes, restored on start)."""

    def __init__(self, state_dir: str | Path, *, accountant: str, delta: float, epsilon_budget: float, site: str = "") -> None:
        """Open the site's ledger under `state_dir`, restoring what an earlier process spent (if any)."""
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.accountant = accountant
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self.site = site
        self.history: list[tuple[float, float, int]] = []
        self.rounds: list[RoundEntry] = []
        self.refusals: list[dict[str, Any]] = []
        self.calibrated_noise: float | None = None
        if self.path.exists():
            self._load()

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        """Restore history, rounds, refusals and calibrated noise; refuse a corrupt or incomparable ledger."""
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            # A corrupt ledger must never be treated as "nothing spent".
            raise RuntimeError(f"privacy ledger {self.path} is unreadable ({exc}); refusing to train") from None
        if raw.get("accountant") != self.accountant or float(raw.get("delta", -1)) != self.delta:
            raise RuntimeError(
                f"privacy ledger {self.path} was kept with accountant={raw.get('accountant')} "
                f"delta={raw.get('delta')}, but the site policy now says accountant={self.accountant} "
                f"delta={self.delta}; epsilons are not comparable (use a new state dir to start over)"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])]
        self.rounds = [RoundEntry(**r) for r in raw.get("rounds", [])]
        self.refusals = list(raw.get("refusals", []))
        self.calibrated_noise = raw.get("calibrated_noise")
        # The budget is the site policy's current one (a site may lower it); the file's copy is informational.
        self.site = self.site or raw.get("site", "")

    def save(self) -> None:
        """Write the ledger atomically (temp file + fsync + rename): a crash leaves old or new, never half."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "epsilon": self.epsilon(),
            "history": [list(h) for h in self.history],
            "rounds": [r.__dict__ for r in self.rounds],
            "refusals": self.refusals,
            "calibrated_noise": self.calibrated_noise,
        }
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())

    # ------------------------------------------------------------------ accounting
    def epsilon(self) -> float:
        """Epsilon spent so far (at this ledger's delta and accountant)."""
        return epsilon_for(self.history, self.delta, self.accountant)

    def steps(self) -> int:
        """DP-SGD steps taken so far, over every recorded round."""
        return sum(n for _, _, n in self.history)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site WOULD reach after `steps` more DP-SGD steps."""
        return epsilon_for(self.history + [(noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int, *, run_id: str = "", server_round: int = 0) -> float:
        """Return the projected epsilon, or record a refusal and raise BudgetExceeded."""
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        if projected > self.epsilon_budget:
            self.refusals.append(
                {"run_id": run_id, "server_round": server_round, "projected_epsilon": projected, "time": time.time()}
            )
            self.save()
            raise BudgetExceeded(
                f"site {self.site or '?'} refuses round {server_round}: epsilon would reach {projected:.4f} "
                f"> budget {self.epsilon_budget:g} (spent {self.epsilon():.4f}, delta {self.delta:g}, {self.accountant})"
            )
        return projected

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, *, run_id: str, server_round: int) -> float:
        """Append the steps actually taken and persist; returns epsilon after."""
        if steps > 0:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        eps = self.epsilon()
        self.rounds.append(
            RoundEntry(run_id, server_round, float(noise_multiplier), float(sample_rate), int(steps), eps, time.time())
        )
        self.save()
        return eps

    def calibrate_noise(self, sample_rate: float, steps_per_round: int, remaining_rounds: int) -> float:
        """Smallest noise (bisection) so the remaining announced rounds fit the remaining budget."""
        steps = max(1, steps_per_round * max(1, remaining_rounds))
        noise = fit_noise(compress_history(self.history), float(sample_rate), steps, self.epsilon_budget, self.delta, self.accountant)
        if noise is None:
            raise BudgetExceeded(
                f"site {self.site or '?'}: even noise 50 cannot fit {remaining_rounds} more rounds in the "
                f"remaining budget (spent {self.epsilon():.4f} of {self.epsilon_budget:g})"
            )
        return noise

    def summary(self) -> dict[str, Any]:
        """The numbers a data-protection officer reads: spent, budget, steps, rounds, refusals."""
        last = self.history[-1] if self.history else (0.0, 0.0, 0)
        return {
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "epsilon_budget": self.epsilon_budget,
            "steps": self.steps(),
            "rounds": len(self.rounds),
            "refusals": len(self.refusals),
            "last_noise_multiplier": last[0],
            "last_sample_rate": last[1],
        }
