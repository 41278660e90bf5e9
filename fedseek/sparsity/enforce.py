"""Enforcing a sparsity mask at the site under Opacus DP-SGD.

`torch.nn.utils.prune` is rejected by Opacus, so masks are plain arrays enforced by
`MaskEnforcer`: it zeroes per-sample gradients of pruned weights before clipping, masks the
noisy gradient before the inner optimizer update, and re-zeroes the weights after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseek.naming import canonical_name


def _pairs(model: nn.Module, mask: Mapping[str, np.ndarray]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Match mask entries to the model's parameters by canonical name: (param, pruned bool tensor)."""
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    out: list[tuple[nn.Parameter, torch.Tensor]] = []
    for key, m in mask.items():
        name = canonical_name(key)
        p = params.get(name)
        if p is None:
            raise ValueError(f"mask tensor {name!r} matches no parameter of the model")
        arr = np.asarray(m)
        if arr.dtype != np.bool_:
            raise ValueError(f"mask for {name!r} must be bool, got {arr.dtype}")
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(arr.shape)}, parameter has {tuple(p.shape)}")
        out.append((p, torch.from_numpy(~arr).to(p.device)))
    return out


class MaskEnforcer:
    """Keeps pruned weights exactly 0 and gradients/noise on active weights only, with or without Opacus.

    `attach(optimizer)` patches `optimizer.step` to (1) zero the per-sample gradients
    (`p.grad_sample`, hooks/functorch/ew modes) and `p.grad` of pruned weights before the
    step, so DP clipping norms count active weights only; (2) for an Opacus `DPOptimizer`,
    zero the noisy `p.grad` of pruned weights in a step pre-hook of the wrapped optimizer
    (noise is added inside `DPOptimizer.pre_step`), keeping momentum/Adam state clean; and
    (3) re-zero the pruned weights after the step, the robust guarantee (e.g. weight decay).
    Masking before clipping and after noise is sound because the mask is public: a fixed
    projection cannot raise the clipped sensitivity. In ghost-clipping mode per-sample
    gradients are never kept, so while attached each masked parameter carries its keep mask
    (`masked_clipping.MASK_ATTR`) and fedseek's mask-aware Opacus samplers compute the
    per-sample norms over active coordinates only (`fedseek.privacy.masked_clipping`).
    Opacus' own single-slot `attach_step_hook` (the accountant) is left untouched.
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, np.ndarray]) -> None:
        """Resolve the mask against the model's parameters once (wrapped `_module.` names accepted)."""
        self._pairs = _pairs(model, mask)
        self._optimizer: Any = None
        self._orig_step: Callable[..., Any] | None = None
        self._had_instance_step = False
        self._hook: Any = None

    @property
    def num_tensors(self) -> int:
        """How many parameters the mask covers."""
        return len(self._pairs)

    def apply(self) -> None:
        """Zero the pruned weights in place."""
        with torch.no_grad():
            for p, pruned in self._pairs:
                p.masked_fill_(pruned, 0.0)

    def after_step(self) -> None:
        """Call after every optimizer step (done for you by `attach`): pruned weights back to exactly 0."""
        self.apply()

    def mask_grads(self) -> None:
        """Zero gradients of pruned weights: `p.grad` and Opacus' per-sample `p.grad_sample` (tensor or list)."""
        with torch.no_grad():
            for p, pruned in self._pairs:
                if p.grad is not None:
                    p.grad.masked_fill_(pruned, 0.0)
                gs = getattr(p, "grad_sample", None)
                for g in gs if isinstance(gs, list) else ([gs] if gs is not None else []):
                    if isinstance(g, torch.Tensor) and g.shape[1:] == p.shape:
                        g.masked_fill_(pruned, 0.0)

    def _mask_plain_grads(self, *_: Any) -> None:
        """Step pre-hook of the wrapped optimizer: remove the noise Opacus put on pruned weights."""
        with torch.no_grad():
            for p, pruned in self._pairs:
                if p.grad is not None:
                    p.grad.masked_fill_(pruned, 0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskEnforcer:
        """Patch `optimizer.step` (plain torch or Opacus DPOptimizer) to enforce the mask on every step."""
        if self._optimizer is not None:
            raise RuntimeError("MaskEnforcer is already attached; detach() first")
        self._had_instance_step = "step" in vars(optimizer)
        orig = optimizer.step
        enforcer = self

        def step(closure: Callable[[], Any] | None = None) -> Any:
            """Masked step: mask (per-sample) grads, run the real step, re-zero pruned weights."""
            if closure is not None:
                user_closure = closure

                def closure() -> Any:  # noqa: E306 - grads exist only after the closure ran
                    loss = user_closure()
                    enforcer.mask_grads()
                    return loss

            else:
                enforcer.mask_grads()
            out = orig(closure) if closure is not None else orig()
            enforcer.after_step()
            return out

        inner = getattr(optimizer, "original_optimizer", None)
        if inner is not None:
            from fedseek.privacy import masked_clipping

            masked_clipping.install()
            for p, pruned in self._pairs:
                setattr(p, masked_clipping.MASK_ATTR, ~pruned)
            self._hook = inner.register_step_pre_hook(self._mask_plain_grads)
        optimizer.step = step  # type: ignore[method-assign]
        self._optimizer, self._orig_step = optimizer, orig
        return self

    def detach(self) -> None:
        """Undo `attach` (restore the optimizer's own step, remove the pre-hook)."""
        opt = self._optimizer
        if opt is None:
            return
        if self._had_instance_step:
            opt.step = self._orig_step
        else:
            vars(opt).pop("step", None)
        if self._hook is not None:
            self._hook.remove()
            from fedseek.privacy.masked_clipping import MASK_ATTR

            for p, _ in self._pairs:
                if hasattr(p, MASK_ATTR):
                    delattr(p, MASK_ATTR)
        self._optimizer = self._orig_step = self._hook = None

    def __enter__(self) -> MaskEnforcer:
        """Use as `with enforce_mask(model, opt, mask): ...`."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Detach on leaving the block."""
        self.detach()


def enforce_mask(model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mapping[str, np.ndarray]) -> MaskEnforcer:
    """Zero pruned weights now and after every `optimizer.step()`; returns the attached enforcer."""
    enforcer = MaskEnforcer(model, mask)
    enforcer.apply()
    return enforcer.attach(optimizer)
