"""Per-sample gradients and norms restricted to a public sparsity mask, inside Opacus.

Why: DP-SGD clips each record's gradient to norm C. With a sparse model only the active
weights are trained, so the clipped norm must count active coordinates only; otherwise the
pruned weights' gradients use up most of the clip budget, are then zeroed, and the signal
that survives is a fraction of C while the noise stays sigma*C (measured on digits, 80% mask,
epsilon 8: 0.33 accuracy with ghost clipping counting pruned coordinates).

Opacus computes per-sample gradients (hooks mode, and the fast-gradient-clipping fallback of
ghost mode) with the functions in its GRAD_SAMPLERS registry, and ghost norms with
NORM_SAMPLERS. `install()` wraps the entries of nn.Linear and nn.Conv1d/2d/3d through Opacus'
own `register_grad_sampler` / `register_norm_sampler`: a parameter that carries a keep mask
(`MASK_ATTR`, set by `MaskEnforcer` while it is attached) gets its per-sample gradients
multiplied by the mask, or its ghost norm computed over the active coordinates:
||M * (g a^T)||^2 = sum_ij M_ij g_i^2 a_j^2 for a linear layer on non-sequence inputs (no
per-sample gradient is materialised). Parameters without a mask take Opacus' own code path.
Masking a per-sample gradient by a public mask before clipping is a fixed projection: the
clipped sensitivity stays C, so the accounting is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MASK_ATTR", "install", "installed"]

MASK_ATTR = "_fedseek_keep"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_lock = threading.Lock()
_installed = False


def _keep(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The keep mask of parameter `p` as a 0/1 tensor of `like`'s dtype/device, or None."""
    keep = getattr(p, MASK_ATTR, None)
    if keep is None:
        return None
    return keep.to(device=like.device, dtype=like.dtype)


def _masked_grad_sampler(orig: Callable[..., dict]) -> Callable[..., dict]:
    """Wrap an Opacus grad sampler: per-sample gradients of masked parameters are zero off the mask."""

    def grad_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        out = orig(layer, activations, backprops)
        for p, gs in list(out.items()):
            keep = _keep(p, gs)
            if keep is not None:
                out[p] = gs * keep  # broadcast over the batch dimension
        return out

    grad_sampler.__wrapped__ = orig  # type: ignore[attr-defined]
    return grad_sampler


def _masked_norm_sampler(orig_norm: Callable[..., dict], grad_sampler: Callable[..., dict]) -> Callable[..., dict]:
    """Wrap an Opacus ghost norm sampler: norms of masked parameters over active coordinates only."""

    def norm_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        masked = [p for p in layer.parameters(recurse=False) if getattr(p, MASK_ATTR, None) is not None and p.requires_grad]
        if not masked:
            return orig_norm(layer, activations, backprops)
        out = orig_norm(layer, activations, backprops)  # unmasked params (bias) keep Opacus' ghost norm
        weight = getattr(layer, "weight", None)
        # norms in float32 even under bf16 autocast: a clipped norm must not overshoot C by rounding
        if isinstance(layer, nn.Linear) and backprops.dim() == 2 and len(masked) == 1 and masked[0] is weight:
            g, a = backprops.float(), activations[0].float()
            keep = _keep(weight, g)
            # sum_ij K_ij g_i^2 a_j^2 per sample, without the B x out x in per-sample gradient
            sq = torch.einsum("ni,ij,nj->n", g * g, keep, a * a).clamp(min=0)
            out[weight] = torch.sqrt(sq)
            return out
        grads = grad_sampler(layer, activations, backprops)  # already masked
        for p in masked:
            gs = grads[p].float()
            out[p] = gs.reshape(len(gs), -1).norm(2, dim=-1)
        return out

    norm_sampler.__wrapped__ = orig_norm  # type: ignore[attr-defined]
    return norm_sampler


def install() -> None:
    """Register the mask-aware samplers with Opacus once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        from opacus.grad_sample.grad_sample_module import GradSampleModule
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
        from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

        for cls in _LAYERS:
            orig = GradSampleModule.GRAD_SAMPLERS.get(cls)
            if orig is None:
                continue
            wrapped = _masked_grad_sampler(orig)
            register_grad_sampler(cls)(wrapped)
            orig_norm = GradSampleModuleFastGradientClipping.NORM_SAMPLERS.get(cls)
            if orig_norm is not None:
                register_norm_sampler(cls)(_masked_norm_sampler(orig_norm, wrapped))
        _installed = True


def installed() -> bool:
    """Whether `install()` has run in this process."""
    return _installed
