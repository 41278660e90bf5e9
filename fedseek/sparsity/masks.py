"""Global sparsity masks held by the coordinator: drawn from a public seed or the DP global model.

Privacy rule (anchors C.2): a mask must never depend on a site's private data. Masks here
come only from a public seed (`init_mask`) or from the DP global model (`magnitude_mask`,
`prune_and_regrow`), both post-processing of DP releases. Growing by private gradients
(RigL's default), SNIP-style saliency or any per-site data statistic would leak outside the
accountant and needs its own DP mechanism and budget, so it is deliberately not offered.

A mask is ``{canonical tensor name: np.ndarray[bool]}`` (True = active) covering only the
masked tensors (weight matrices / conv kernels); every other tensor (biases, norm params)
is dense. Canonical names drop Opacus' ``_module.`` prefix, so wrapped and plain models share
one mask. The schedule is in `fedseek.sparsity.schedule`, site-side enforcement in
`fedseek.sparsity.enforce`, the bit packing for the wire in `fedseek.wire.mask_bits`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseek.naming import canonical_name

Mask = dict[str, np.ndarray]


_SCOPES = ("weights", "all")  # which tensors a mask covers


_DISTRIBUTIONS = ("erk", "uniform")  # how `init_mask` spreads the density over layers


_MAGNITUDE_SCOPES = ("global", "layer")  # how `magnitude_mask` ranks weights


_REGROW_RULES = ("random", "magnitude")  # where `prune_and_regrow` grows


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


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity in [0, 1) (bools and non-numbers refused); returns it as a float."""
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
    s = check_sparsity(sparsity)
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"unknown mask distribution {distribution!r}; allowed: {', '.join(_DISTRIBUTIONS)}")
    items = _maskable_items(state_dict, scope)
    shapes = [a.shape for _, a in items]
    if distribution == "erk":
        densities = _erk_densities([tuple(int(d) for d in sh) for sh in shapes], 1.0 - s)
    else:
        densities = [1.0 - s] * len(items)
    mask: Mask = {}
    for (name, arr), dens in zip(items, densities, strict=True):
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
    s = check_sparsity(sparsity)
    if scope not in _MAGNITUDE_SCOPES:
        raise ValueError(f"unknown magnitude scope {scope!r}; allowed: {', '.join(_MAGNITUDE_SCOPES)}")
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
    if regrow not in _REGROW_RULES:
        raise ValueError(f"unknown regrow rule {regrow!r}; allowed: {', '.join(_REGROW_RULES)}")
    weights = {canonical_name(k): v for k, v in state_dict.items()}
    new: Mask = {}
    for key, m in mask.items():
        name = canonical_name(key)
        if name not in weights:
            raise ValueError(f"mask tensor {name!r} is not in the state_dict")
        new[name] = _move_weights(name, _np(weights[name]), np.asarray(m, dtype=bool), drop_fraction, seed, regrow)
    return new


def _move_weights(name: str, w: np.ndarray, m: np.ndarray, drop_fraction: float, seed: int, regrow: str) -> np.ndarray:
    """One tensor's new mask: drop the smallest active |w|, grow as many inactive coordinates (same density)."""
    if w.shape != m.shape:
        raise ValueError(f"mask for {name!r} has shape {m.shape}, weights have {w.shape}")
    flat_m = m.ravel().copy()
    absw = np.abs(w.astype(np.float32).ravel())
    active = np.flatnonzero(flat_m)
    inactive = np.flatnonzero(~flat_m)
    n_move = min(int(round(drop_fraction * active.size)), inactive.size)
    if n_move == 0:
        return m.copy()
    rng = _rng(seed, name, salt=1)
    tie = rng.random(flat_m.size)
    drop = active[np.lexsort((tie[active], absw[active]))[:n_move]]  # smallest |w|, random ties
    if regrow == "random":
        grow = rng.choice(inactive, size=n_move, replace=False)
    else:
        grow = inactive[np.lexsort((tie[inactive], -absw[inactive]))[:n_move]]
    flat_m[drop] = False
    flat_m[grow] = True
    return flat_m.reshape(m.shape)


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
