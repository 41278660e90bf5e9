"""The coordinator's global model: weights as numpy arrays, the sparsity mask, and the torch module to evaluate them.

Pruning the aggregate (progressive magnitude pruning, regrowth) is post-processing of DP
releases: it costs no privacy and uses no site data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedseek.config import FederationSpec
from fedseek.naming import canonical_name
from fedseek.sparsity import init_mask, magnitude_mask, prune_and_regrow, schedule_sparsity, sparsity_of
from fedseek.train.local import evaluate, evaluate_regression, predict_scores, predict_values
from fedseek.train.models import build_model
from fedseek.wire.transfer import from_record, to_record

Arrays = dict[str, np.ndarray]


def state_arrays(module: torch.nn.Module) -> Arrays:
    """A module's state_dict as float32 numpy copies."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in module.state_dict().items()}


class GlobalModel:
    """Weights, mask and module of the shared model, with the run's sparsity policy."""

    def __init__(self, cfg: FederationSpec, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.cfg = cfg
        self.module = build_model(cfg.model.kind, input_shape, num_classes, cfg.model.hidden, seed=cfg.seed, width=cfg.model.width)
        self.arrays: Arrays = state_arrays(self.module)
        self.mask: Arrays | None = None
        self.ema_decay = float(cfg.strategy.ema_decay)
        self.ema: Arrays | None = None  # strategy.ema_decay > 0: the released model, an average of the global models
        if cfg.sparsity.enabled and cfg.sparsity.schedule == "fixed":
            # data-independent: drawn from the run's seed before any site trains
            self.mask = init_mask(self.arrays, cfg.sparsity.target, seed=cfg.seed)
            self.apply_mask()

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense fp32 weights."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    def record(self) -> Any:
        """The weights as a Flower ArrayRecord."""
        return to_record(self.arrays)

    def set_record(self, record: Any) -> None:
        """Take the aggregate a strategy returned."""
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in from_record(record).items()}

    def load_module(self) -> torch.nn.Module:
        """The torch module holding the current weights."""
        self.module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})
        return self.module

    def take_module(self) -> None:
        """Read the weights back from the module (after coordinator-side fine-tuning), keeping the mask."""
        self.arrays = state_arrays(self.module)
        self.apply_mask()

    def apply_mask(self) -> None:
        """Zero the pruned coordinates."""
        self.arrays = self._masked(self.arrays)

    def _masked(self, arrays: Arrays) -> Arrays:
        """`arrays` with the pruned coordinates zeroed (the same dict without a mask)."""
        if self.mask is None:
            return arrays
        for k in arrays:
            m = self.mask.get(canonical_name(k))
            if m is not None:
                arrays[k] = np.where(m, arrays[k], 0.0).astype(np.float32)
        return arrays

    def update_mask(self, rnd: int) -> float:
        """Progressive magnitude pruning of the aggregate (schedule from config); returns the sparsity now in force."""
        sp = self.cfg.sparsity
        if not sp.enabled:
            return 0.0
        if sp.schedule == "progressive":
            target = schedule_sparsity(rnd, self.cfg.rounds, sp.target, start_round=sp.start_round, end_fraction=sp.end_fraction)
            current = self.sparsity()
            if target > current + 1e-9:
                self.mask = magnitude_mask(self.arrays, target)
            elif sp.regrow_fraction > 0 and self.mask is not None and target >= sp.target - 1e-9:
                self.mask = prune_and_regrow(self.arrays, self.mask, sp.regrow_fraction, seed=self.cfg.seed + rnd)
        self.apply_mask()
        return self.sparsity()

    def update_average(self) -> None:
        """strategy.ema_decay: fold this round's global model into the released average (post-processing of DP releases).

        Sites keep training from the latest global model; the average is what is evaluated and saved:
        under DP the noise of successive rounds is independent, so averaging them cancels part of it.
        """
        if self.ema_decay <= 0.0:
            return
        if self.ema is None:
            self.ema = {k: v.copy() for k, v in self.arrays.items()}
        else:
            d = self.ema_decay
            self.ema = {k: (d * self.ema[k] + (1.0 - d) * v).astype(np.float32) for k, v in self.arrays.items()}
        self.ema = self._masked(self.ema)

    @property
    def released(self) -> Arrays:
        """The model the run releases: the average (strategy.ema_decay > 0, after round 1) or the latest global model."""
        return self.ema if self.ema is not None else self.arrays

    def sparsity(self) -> float:
        """Fraction of masked coordinates (0 without a mask)."""
        return sparsity_of(self.mask) if self.mask is not None else 0.0

    def evaluate(self, test: Any) -> dict[str, float]:
        """Central evaluation of the released model on the coordinator's held-out set ({} when it has none)."""
        if test is None:
            return {}
        if self.ema is not None:
            return self.evaluate_arrays(self.ema, test)[0]
        return _metrics(self.load_module(), test)

    def evaluate_arrays(self, arrays: Arrays, test: Any) -> tuple[dict[str, float], np.ndarray | None]:
        """Central metrics and predicted classes of other weights (e.g. the best round's) on the test set; the module is restored."""
        if test is None:
            return {}, None
        current = self.arrays
        try:
            self.arrays = arrays
            module = self.load_module()
            if getattr(test, "regression", False):
                return _metrics(module, test), predict_values(module, test.x)
            return _metrics(module, test), predict_scores(module, test.x).argmax(1)
        finally:
            self.arrays = current
            self.load_module()

    def state_dict(self) -> dict[str, Any]:
        """Weights, mask and the released average."""
        return {"arrays": self.arrays, "mask": self.mask, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and mask; ValueError when they belong to another architecture."""
        arrays = state["arrays"]
        if set(arrays) != set(self.arrays) or any(arrays[k].shape != v.shape for k, v in self.arrays.items()):
            raise ValueError("checkpoint does not match this model's architecture")
        self.arrays, self.mask, self.ema = arrays, state["mask"], state.get("ema")  # checkpoints before ema_decay lack it


def _metrics(module: Any, test: Any) -> dict[str, float]:
    """Classification metrics, or regression metrics in the target's own units."""
    if getattr(test, "regression", False):
        return evaluate_regression(module, test.x, test.y, test.target_scale)
    return evaluate(module, test.x, test.y, test.num_classes)
