"""Model selection: the best round by a chosen central metric (model.pt), early stopping, and the baseline check.

The coordinator's central test set is its own data, held in the open: judging rounds on it costs
no site any privacy. It is also the set the chosen model's score is reported on, so that score is
optimistic (selection on the test set); the summary says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedseek.config.federation import SelectionSpec
from fedseek.outputs.schema import BaselineCheck, MetricsRow, SelectionSummary

Arrays = dict[str, np.ndarray]
LOWER_IS_BETTER = {"loss", "rmse", "mae"}


class Selection:
    """Tracks the best round and its weights; a checkpoint part (state_dict / load_state_dict), so a resumed run keeps it."""

    def __init__(self, spec: SelectionSpec) -> None:
        self.spec = spec
        self.best_round: int | None = None
        self.best_value: float | None = None
        self.best_arrays: Arrays | None = None
        self.best_central: dict[str, float] = {}
        self.rounds_without_gain = 0
        self.early_stopped_after: int | None = None

    @property
    def active(self) -> bool:
        """False for `metric: last` (the last round is the model)."""
        return self.spec.metric != "last"

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        gain = self.best_value - value if self.spec.metric in LOWER_IS_BETTER else value - self.best_value
        return gain > self.spec.min_delta

    def judged(self, row: MetricsRow) -> dict[str, float] | None:
        """The metrics a round is judged on (its source's), None when that source did not evaluate this round."""
        if self.spec.source == "central":
            return {k: float(v) for k, v in row.central.items() if v is not None}
        fed = row.federated
        if fed is None or not fed.evaluated:
            return None
        return {k: float(v) for k in ("accuracy", "balanced_accuracy", "loss", "r2", "rmse", "mae") if (v := getattr(fed, k)) is not None}

    def observe(self, rnd: int, central: dict[str, float] | None, arrays: Arrays) -> bool:
        """Record round `rnd`'s metrics (None: not judged this round); True when the run should stop early (patience used up)."""
        if not self.active or central is None:
            return False
        value = central.get(self.spec.metric)
        if value is None or not np.isfinite(value):
            self.rounds_without_gain += 1
        elif self._better(float(value)):
            self.best_round, self.best_value = rnd, float(value)
            self.best_arrays = {k: v.copy() for k, v in arrays.items()}
            self.best_central = dict(central)
            self.rounds_without_gain = 0
        else:
            self.rounds_without_gain += 1
        if self.spec.patience is not None and self.rounds_without_gain >= self.spec.patience:
            self.early_stopped_after = rnd
            return True
        return False

    def summary(self, last_round: int) -> SelectionSummary:
        """Which round model.pt holds, and why."""
        if not self.active or self.best_round is None:
            why = "metric 'last': the last round" if not self.active else f"no round had a finite {self.spec.metric}: the last round"
            return SelectionSummary(metric=self.spec.metric, round=last_round, reason=why)
        direction = "lowest" if self.spec.metric in LOWER_IS_BETTER else "highest"
        where = "central" if self.spec.source == "central" else "federated-evaluation"
        reason = f"{direction} {where} {self.spec.metric} ({self.best_value:.4f}) over rounds 1..{last_round}"
        if self.early_stopped_after is not None:
            reason += f"; stopped early after round {self.early_stopped_after} ({self.spec.patience} rounds without improvement)"
        return SelectionSummary(metric=self.spec.metric, round=self.best_round, value=self.best_value, central=self.best_central,
                                reason=reason, early_stopped_after=self.early_stopped_after)

    def state_dict(self) -> dict[str, Any]:
        """Best round, value, weights and patience counter."""
        return {"best_round": self.best_round, "best_value": self.best_value, "best_arrays": self.best_arrays,
                "best_central": self.best_central, "rounds_without_gain": self.rounds_without_gain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint."""
        self.best_round, self.best_value = state["best_round"], state["best_value"]
        self.best_arrays, self.best_central = state["best_arrays"], dict(state["best_central"])
        self.rounds_without_gain = int(state["rounds_without_gain"])


def baseline_check(test: Any, metrics: dict[str, float], predictions: np.ndarray | None) -> BaselineCheck | None:
    """The chosen model against predicting the majority class for everyone (None without a central test set).

    `warning` is set when the model does not beat that baseline: accuracy no higher than the
    majority share, or balanced accuracy within 0.02 of chance (1 / number of classes).
    """
    if test is None or len(test) == 0 or predictions is None:
        return None
    if getattr(test, "regression", False):
        return _mean_baseline(test, metrics)
    y = np.asarray(test.y)
    counts = np.bincount(y, minlength=test.num_classes)
    majority = int(counts.argmax())
    names = test.classes or [str(k) for k in range(test.num_classes)]
    share = float(counts[majority] / len(y))
    recall = {names[k]: float((predictions[y == k] == k).mean()) for k in range(test.num_classes) if counts[k]}
    acc, bal = metrics.get("accuracy"), metrics.get("balanced_accuracy")
    chance = 1.0 / test.num_classes
    warning = None
    if acc is not None and bal is not None and (acc <= share + 1e-12 or bal <= chance + 0.02):
        warning = (f"the model does not beat the majority-class baseline: accuracy {acc:.4f} vs {share:.4f} for predicting "
                   f"{names[majority]!r} for everyone; balanced accuracy {bal:.4f} (chance {chance:.2f})")
    return BaselineCheck(majority_class=names[majority], majority_accuracy=share, recall=recall, warning=warning)


def _mean_baseline(test: Any, metrics: dict[str, float]) -> BaselineCheck:
    """A regression model against predicting the test targets' mean for everyone (R^2 <= 0 is no better)."""
    y = np.asarray(test.y, dtype=np.float64)
    if test.target_scale is not None:
        y = y * test.target_scale[1] + test.target_scale[0]
    mean_rmse = float(np.sqrt(np.mean((y - y.mean()) ** 2)))
    r2 = metrics.get("r2")
    warning = None
    if r2 is not None and np.isfinite(r2) and r2 <= 0.0:
        warning = (f"the model does not beat predicting the mean for everyone: R² {r2:.4f} <= 0 "
                   f"(RMSE {metrics.get('rmse', float('nan')):.4g} vs {mean_rmse:.4g} for the mean)")
    return BaselineCheck(mean_rmse=mean_rmse, warning=warning)
