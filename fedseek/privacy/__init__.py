"""Record-level DP at each site: the persistent ledger, budget calibration, one DP-SGD round, masked clipping.

Names are imported on first use: the ledger and its lock are cheap, while DP-SGD and the accountants
pull in torch and Opacus (~4 s), which `fedseek privacy show` or a process taking the lock need not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedseek.privacy.accounting import epsilon_for
    from fedseek.privacy.budget import noise_for_round, plan_round
    from fedseek.privacy.dp_round import BF16_NORM_SLACK, DPRound
    from fedseek.privacy.ledger import (
        EVALUATION_LEDGER_FILE,
        LEDGER_FILE,
        BudgetExceeded,
        LedgerBusy,
        LedgerError,
        LedgerKind,
        PrivacyLedger,
    )

_EXPORTS = {
    "BF16_NORM_SLACK": "dp_round",
    "DPRound": "dp_round",
    "EVALUATION_LEDGER_FILE": "ledger",
    "LEDGER_FILE": "ledger",
    "BudgetExceeded": "ledger",
    "LedgerBusy": "ledger",
    "LedgerError": "ledger",
    "LedgerKind": "ledger",
    "PrivacyLedger": "ledger",
    "epsilon_for": "accounting",
    "noise_for_round": "budget",
    "plan_round": "budget",
}

__all__ = [
    "BF16_NORM_SLACK",
    "EVALUATION_LEDGER_FILE",
    "LEDGER_FILE",
    "BudgetExceeded",
    "DPRound",
    "LedgerBusy",
    "LedgerError",
    "LedgerKind",
    "PrivacyLedger",
    "epsilon_for",
    "noise_for_round",
    "plan_round",
]


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
