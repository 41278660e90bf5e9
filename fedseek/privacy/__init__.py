"""Record-level DP at each site: the persistent ledger, budget calibration, one DP-SGD round, masked clipping."""

from fedseek.privacy.accounting import epsilon_for
from fedseek.privacy.budget import noise_for_round, plan_round
from fedseek.privacy.dp_round import BF16_NORM_SLACK, DPRound
from fedseek.privacy.ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger

__all__ = ["BF16_NORM_SLACK", "LEDGER_FILE", "BudgetExceeded", "DPRound", "PrivacyLedger", "epsilon_for", "noise_for_round", "plan_round"]
