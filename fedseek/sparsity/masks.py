"""Global sparsity masks held by the coordinator, and their enforcement under Opacus DP-SGD.

Privacy rule (anchors C.2): a mask must never depend on a site's private data. Masks here
come only from a public seed (`init_mask`) or from the DP global model (`magnitude_mask`,
`prune_and_regrow`), both post-processing of DP releases. Growing by private gradients
(RigL's default), SNIP-style saliency or any per-site data statistic would leak outside the
accountant and needs its own DP mechanism and budget, so it is deliberately not offered.

A mask is ``{canonical tensor name: np.ndarray[bool]}`` (True = active) covering only the
masked tensors (weight matrices / conv kernels); every other tensor (biases, norm params)
is dense. Canonical names drop Opacus' ``_module.`` prefix, so wrapped and plain models share
one mask. `torch.nn.utils.prune` is rejected by Opacus, so masks are plain arrays enforced by
`MaskEnforcer`: it zeroes per-sample gradients of pruned weights before clipping, masks the
noisy gradient before the inner optimizer update, and re-zeroes the weights after every step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fedseek.naming import canonical_name
import torch
from torch import nn

__all__ = [
    "Mask",
    "canonical_name",
    "maskable",
    "init_mask",
    "magnitude_mask",
    "schedule_sparsity",
    "prune_and_regrow",
    "apply_mask_",
    "MaskEnforcer",
    "enforce_mask",
    "sparsity_of",
    "pack_mask",
    "unpack_mask",
]

Mask = dict[str, np.ndarray]
_SCOPES = ("weights", "all")
_DISTRIBUTIONS = ("erk", "uniform")


def _np(t: Any) -> np.ndarray:
    """A detached float32/bool numpy view of a tensor or array (bf16 upcast)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def maskable(name: str, tensor: Any, scope: str = "weights") -> bool:
    """Whether a tensor is subject to masking: "weights" = floating with ndim >= 2; "all" = any floating."""
    if scope not in _SCOPES:
        raise ValueError(f"unknown mask scope {scope!r}; allowed: {', '.join(_SCOPES)}")
    if isinstance(tensor, torch.Tensor):
        floating, ndim = tensor.is_floating_point(), tensor.dim()
    else:
        arr = np.asarray(tensor)
        floating, ndim = arr.dtype.kind == "f", arr.ndim
    return floating and (ndim >= 2 if scope == "weights" else ndim >= 1)


def _check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _maskable_items(state_dict: Mapping[str, Any], scope: str = "weights") -> list[tuple[str, np.ndarray]]:
    """(canonical name, numpy array) of every maskable tensor, in state_dict order."""
    out: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for name, t in state_dict.items():
        if maskable(name, t, scope):
            cname = canonical_name(name)
            if cname in seen:
                raise ValueError(f"two tensors share the canonical name {cname!r}")
            seen.add(cname)
            out.append((cname, _np(t)))
    return out


def _rng(seed: int, name: str, salt: int = 0) -> np.random.Generator:
    """A generator per (seed, tensor name): masks do not depend on dict order or other layers."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(salt)])


def _erk_densities(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020): ∝ sum(shape)/prod(shape), capped at 1, mean = density."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) if math.prod(s) else 0.0 for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        if divisor <= 0:
            eps = 0.0
            break
        eps = budget / divisor
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else max(0.0, eps * raw[i]) for i in range(len(shapes))]


def init_mask(
    state_dict: Mapping[str, torch.Tensor | np.ndarray],
    sparsity: float,
    seed: int,
    scope: str = "weights",
    distribution: str = "erk",
) -> Mask:
    """Random mask fixed at init from `seed` alone (data-independent): ERK or uniform per-layer density.

    Only maskable tensors (see `maskable`) appear in the mask; each keeps at least one weight.
    Overall sparsity over the masked tensors equals `sparsity` up to per-layer rounding.
    """
    s = _check_sparsity(sparsity)
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"unknown mask distribution {distribution!r}; allowed: {', '.join(_DISTRIBUTIONS)}")
    items = _maskable_items(state_dict, scope)
    shapes = [a.shape for _, a in items]
    if distribution == "erk":
        densities = _erk_densities([tuple(int(d) for d in sh) for sh in shapes], 1.0 - s)
    else:
        densities = [1.0 - s] * len(items)
    mask: Mask = {}
    for (name, arr), dens in zip(items, densities):
        n = arr.size
        keep = min(n, max(1 if n else 0, int(round(dens * n))))
        flat = np.zeros(n, dtype=bool)
        flat[_rng(seed, name).permutation(n)[:keep]] = True
        mask[name] = flat.reshape(arr.shape)
    return mask


def magnitude_mask(state_dict: Mapping[str, torch.Tensor | np.ndarray], sparsity: float, scope: str = "global") -> Mask:
    """Prune the smallest |w| of the (DP) global model: post-processing; exact count per scope.

    "global" ranks all weight tensors together (each layer still keeps at least its largest
    weight, so no layer dies); "layer" prunes `sparsity` of every layer.
    """
    s = _check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"unknown magnitude scope {scope!r}; allowed: global, layer")
    items = _maskable_items(state_dict, "weights")
    mask: Mask = {}
    if scope == "layer":
        for name, arr in items:
            a = np.abs(arr.astype(np.float32).ravel())
            keep = max(1 if a.size else 0, a.size - int(round(s * a.size)))
            mask[name] = _top_mask(a, keep).reshape(arr.shape)
        return mask
    if not items:
        return mask
    scores = np.concatenate([np.abs(a.astype(np.float32).ravel()) for _, a in items])
    keep = max(1, scores.size - int(round(s * scores.size)))
    flat = _top_mask(scores, keep)
    offset = 0
    for name, arr in items:
        part = flat[offset : offset + arr.size].copy()
        if arr.size and not part.any():
            part[int(np.argmax(np.abs(arr.ravel())))] = True
        mask[name] = part.reshape(arr.shape)
        offset += arr.size
    return mask


def _top_mask(scores: np.ndarray, keep: int) -> np.ndarray:
    """Bool vector marking exactly `keep` largest scores (deterministic tie-break)."""
    out = np.zeros(scores.size, dtype=bool)
    if keep >= scores.size:
        out[:] = True
    elif keep > 0:
        out[np.argpartition(-scores, keep - 1)[:keep]] = True
    return out


def schedule_sparsity(
    round: int,
    total_rounds: int,
    final_sparsity: float,
    start_round: int = 1,
    end_fraction: float = 0.75,
    initial_sparsity: float = 0.0,
) -> float:
    """Zhu & Gupta (2017) cubic schedule: s_t = s_f + (s_i - s_f)(1 - p)^3, p ramps 0->1 over the run's first `end_fraction`.

    Rounds are 1-based (Flower). Sparsity is `initial_sparsity` up to `start_round`, rises
    monotonically and reaches `final_sparsity` at round ceil(end_fraction * total_rounds).
    """
    if total_rounds < 1 or round < 0 or start_round < 0:
        raise ValueError(f"need total_rounds >= 1 and non-negative rounds, got round={round}, total={total_rounds}, start={start_round}")
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction!r}")
    sf = _check_sparsity(final_sparsity)
    si = _check_sparsity(initial_sparsity)
    end_round = max(start_round, math.ceil(end_fraction * total_rounds))
    if round <= start_round:
        return si if end_round > start_round or round < start_round else sf
    if round >= end_round:
        return sf
    p = (round - start_round) / (end_round - start_round)
    return sf + (si - sf) * (1.0 - p) ** 3


def prune_and_regrow(
    state_dict: Mapping[str, torch.Tensor | np.ndarray],
    mask: Mapping[str, np.ndarray],
    drop_fraction: float,
    seed: int,
    regrow: str = "random",
) -> Mask:
    """RigL-style mask update at constant density, using only the DP global model and a public seed.

    Per layer: drop the `drop_fraction` of active weights with the smallest |w| of the DP
    global model, and regrow as many among the previously inactive coordinates, either
    uniformly at random ("random") or by |w| of the global model ("magnitude", ties broken
    randomly; meaningful only when the global model carries values at pruned coordinates,
    e.g. after a dense aggregation). RigL grows by gradient magnitude; a site's gradient is a
    function of its private records, so growing by it outside the accounted DP-SGD would
    leak them (anchors C.2). Regrown weights should start at 0 (they are 0 in a masked model).
    """
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction!r}")
    if regrow not in ("random", "magnitude"):
        raise ValueError(f"unknown regrow rule {regrow!r}; allowed: random, magnitude")
    weights = {canonical_name(k): v for k, v in state_dict.items()}
    new: Mask = {}
    for key, m in mask.items():
        name = canonical_name(key)
        if name not in weights:
            raise ValueError(f"mask tensor {name!r} is not in the state_dict")
        w = _np(weights[name])
        m = np.asarray(m, dtype=bool)
        if w.shape != m.shape:
            raise ValueError(f"mask for {name!r} has shape {m.shape}, weights have {w.shape}")
        flat_m = m.ravel().copy()
        absw = np.abs(w.astype(np.float32).ravel())
        active = np.flatnonzero(flat_m)
        inactive = np.flatnonzero(~flat_m)
        n_move = min(int(round(drop_fraction * active.size)), inactive.size)
        if n_move == 0:
            new[name] = m.copy()
            continue
        rng = _rng(seed, name, salt=1)
        tie = rng.random(flat_m.size)
        drop = active[np.lexsort((tie[active], absw[active]))[:n_move]]  # smallest |w|, random ties
        if regrow == "random":
            grow = rng.choice(inactive, size=n_move, replace=False)
        else:
            grow = inactive[np.lexsort((tie[inactive], -absw[inactive]))[:n_move]]
        flat_m[drop] = False
        flat_m[grow] = True
        new[name] = flat_m.reshape(m.shape)
    return new


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


def apply_mask_(model: nn.Module, mask: Mapping[str, np.ndarray]) -> int:
    """Zero the pruned weights of `model` in place (plain or Opacus-wrapped); returns tensors masked."""
    pairs = _pairs(model, mask)
    with torch.no_grad():
        for p, pruned in pairs:
            p.masked_fill_(pruned, 0.0)
    return len(pairs)


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


def sparsity_of(model_or_state: nn.Module | Mapping[str, Any], scope: str = "weights") -> float:
    """Fraction of exact zeros over maskable tensors of a model/state_dict, or of False entries of a mask."""
    if isinstance(model_or_state, nn.Module):
        items: Iterable[tuple[str, Any]] = model_or_state.named_parameters()
    else:
        items = model_or_state.items()
    zeros = total = 0
    for name, t in items:
        arr = _np(t)
        if arr.dtype == np.bool_:
            zeros += int(arr.size - np.count_nonzero(arr))
            total += arr.size
        elif maskable(name, arr, scope):
            zeros += int(arr.size - np.count_nonzero(arr))
            total += arr.size
    return zeros / total if total else 0.0


def pack_mask(mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """1 bit per coordinate (uint8, little bit order) for the downlink: {name: packed}; shapes travel separately."""
    return {canonical_name(k): np.packbits(np.asarray(v, dtype=bool).ravel(), bitorder="little") for k, v in mask.items()}


def unpack_mask(packed: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Mask:
    """Inverse of `pack_mask`, validating byte lengths and padding against the expected shapes."""
    if set(packed) != set(shapes):
        raise ValueError(f"packed mask tensors {sorted(packed)} differ from expected {sorted(shapes)}")
    out: Mask = {}
    for name, raw in packed.items():
        arr = np.asarray(raw)
        shape = tuple(int(d) for d in shapes[name])
        n = math.prod(shape)
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != (n + 7) // 8:
            raise ValueError(f"packed mask {name!r}: expected {(n + 7) // 8} uint8 bytes, got {arr.dtype} {arr.shape}")
        bits = np.unpackbits(arr, bitorder="little")
        if bits[n:].any():
            raise ValueError(f"packed mask {name!r}: padding bits set")
        out[name] = bits[:n].astype(bool).reshape(shape)
    return out
