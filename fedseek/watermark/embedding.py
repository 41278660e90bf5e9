"""Embedding the mark: short, clipped SGD steps on the trigger set only (no site data: zero privacy cost).

Why these defaults (benchmarks/watermark_federated.py: digits CNN on 20 sites, breast-cancer MLP on 10):
the damage of one re-embedding grows with the step length (the distillation term can only hold the task
function in place between short steps) and shrinks with the distillation weight (breast cancer: cost
0.46 -> 0.07 points from weight 5 to 10, 20 seeds); the price is more steps in the first rounds (a few
hundred from an unmarked model). Adam steps (lr 5e-3) moved every weight by ~lr per step whatever its
gradient and cost ~1.8 points of digits accuracy, so they are not offered.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedseek.watermark.keys import WatermarkKey
from fedseek.watermark.triggers import _rng, _synthetic_inputs, trigger_set


@dataclass
class EmbedReport:
    """What one embedding pass did."""

    steps: int
    trigger_accuracy_before: float
    trigger_accuracy_after: float
    seconds: float
    weight_shift: float  # ||theta_after - theta_before|| / ||theta_before||
    distill_kl: float  # final KL(pre-embed || post-embed) on the synthetic inputs
    reached_target: bool

    def to_dict(self) -> dict:
        """Plain dict (for metrics.jsonl)."""
        return asdict(self)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on (x, y) under no_grad."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def embed(
    model: nn.Module,
    key: WatermarkKey,
    *,
    target_accuracy: float = 0.98,
    max_steps: int = 600,
    min_steps: int = 0,
    lr: float = 0.05,
    momentum: float = 0.9,
    clip_norm: float = 0.5,
    anchor_weight: float = 1e-2,
    distill_weight: float = 10.0,
    n_distill: int = 256,
    distill_inputs: torch.Tensor | None = None,
    perturb: float = 0.05,
    seed: int | None = None,
    mask: Any = None,
) -> EmbedReport:
    """Fine-tune `model` in place on the key's triggers (no site data) until trigger accuracy >= target.

    `mask` (the coordinator's public sparsity mask) keeps pruned weights at exactly zero throughout.
    A model already at the target is left exactly as it is (0 steps, unless `min_steps`).
    """
    # Loss = CE(triggers) + distill_weight * KL(pre-embed || model) on seeded synthetic inputs (or the
    # caller's public `distill_inputs`) + anchor_weight * ||theta - theta_start||^2. Gradients are taken at
    # weights multiplicatively perturbed by N(0, perturb^2) (0 disables) and clipped to total norm
    # `clip_norm` (0 disables); SGD with momentum, i.e. short steps along the gradient, and no step once the
    # target is met. Deterministic given the key and `seed` (default: from the key). Defaults: module docstring.
    t0 = time.perf_counter()
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if clip_norm < 0:
        raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    x_t, y_t = (t.to(params[0].device) for t in trigger_set(key))
    was_training = model.training
    model.eval()  # fedseek models have no dropout/BN; eval keeps any such layer deterministic
    acc_before = _accuracy(model, x_t, y_t)
    rng = _rng(key, "embed") if seed is None else np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    distill = None
    if distill_weight > 0:
        inputs = distill_inputs if distill_inputs is not None else _synthetic_inputs(rng, n_distill, key.input_shape, key.is_image)
        distill = _Distillation(model, inputs.float().to(params[0].device), distill_weight)
    run = _EmbedRun(model, params, x_t, y_t, distill, gen, lr=lr, momentum=momentum, clip_norm=clip_norm,
                    anchor_weight=anchor_weight, perturb=perturb, mask=mask)
    steps, reached = run.until(target_accuracy, min_steps, max_steps)
    model.train(was_training)
    return EmbedReport(steps=steps, trigger_accuracy_before=acc_before, trigger_accuracy_after=_accuracy(model, x_t, y_t),
                       seconds=time.perf_counter() - t0, weight_shift=run.weight_shift(),
                       distill_kl=distill.kl(model) if distill is not None else 0.0, reached_target=reached)


class _Distillation:
    """KL(pre-embed model || model) on public inputs: holds the task function in place while the mark goes in."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, weight: float) -> None:
        teacher = copy.deepcopy(model).eval()
        with torch.no_grad():
            self.teacher_logp = F.log_softmax(teacher(inputs), dim=1)
        self.inputs, self.weight = inputs, weight

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The KL term (unweighted)."""
        return F.kl_div(F.log_softmax(model(self.inputs), dim=1), self.teacher_logp, log_target=True, reduction="batchmean")

    def kl(self, model: nn.Module) -> float:
        """The KL term now, without gradients."""
        with torch.no_grad():
            return float(self.loss(model))


class _EmbedRun:
    """The embedding's optimisation: perturbed, anchored, clipped SGD steps on the trigger set."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], x_t: torch.Tensor, y_t: torch.Tensor,
                 distill: _Distillation | None, gen: torch.Generator, *, lr: float, momentum: float, clip_norm: float,
                 anchor_weight: float, perturb: float, mask: Any) -> None:
        self.model, self.params, self.x_t, self.y_t, self.distill, self.gen = model, params, x_t, y_t, distill, gen
        self.clip_norm, self.anchor_weight, self.perturb, self.mask = clip_norm, anchor_weight, perturb, mask
        self.start = [p.detach().clone() for p in params]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def until(self, target: float, min_steps: int, max_steps: int) -> tuple[int, bool]:
        """Step until the trigger accuracy reaches `target` (and at least `min_steps`); (steps, reached)."""
        enforcer = None
        if self.mask:
            from fedseek.sparsity import enforce_mask

            enforcer = enforce_mask(self.model, self.opt, self.mask)
        steps = 0
        with torch.enable_grad():
            while steps < max_steps and not (steps >= min_steps and _accuracy(self.model, self.x_t, self.y_t) >= target):
                self.step()
                steps += 1
        if enforcer is not None:
            enforcer.detach()
        return steps, _accuracy(self.model, self.x_t, self.y_t) >= target

    def step(self) -> None:
        """One step: gradient at perturbed weights, anchor pull towards the start, clip, SGD."""
        noise: list[torch.Tensor] = []
        if self.perturb > 0:
            with torch.no_grad():
                for p in self.params:
                    e = torch.randn(p.shape, generator=self.gen).to(device=p.device, dtype=p.dtype) * self.perturb * p.abs()
                    p.add_(e)
                    noise.append(e)
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x_t), self.y_t)
        if self.distill is not None:
            loss = loss + self.distill.weight * self.distill.loss(self.model)
        loss.backward()
        with torch.no_grad():
            for p, e in zip(self.params, noise, strict=False):
                p.sub_(e)
            if self.anchor_weight > 0:
                for p, s in zip(self.params, self.start, strict=True):  # gradient of anchor_weight * ||p - s||^2
                    if p.grad is not None:
                        p.grad.add_(p - s, alpha=2.0 * self.anchor_weight)
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()

    def weight_shift(self) -> float:
        """||theta - theta_start|| / ||theta_start||."""
        with torch.no_grad():
            num = math.sqrt(sum(float(((p - s) ** 2).sum()) for p, s in zip(self.params, self.start, strict=True)))
            den = math.sqrt(sum(float((s**2).sum()) for s in self.start)) or 1.0
        return num / den
