"""Detection from outputs alone: matches on the trigger set and an exact binomial p-value."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from fedseek.watermark.keys import WatermarkKey, load_key
from fedseek.watermark.triggers import trigger_set


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a black-box verification: matches m of n, exact p = P(Bin(n, 1/K) >= m)."""

    matches: int
    n: int
    num_classes: int
    p_value: float
    alpha: float
    detected: bool
    verdict: str

    def to_dict(self) -> dict:
        """Plain dict (for summary.json)."""
        return asdict(self)


def p_value(matches: int, n: int, num_classes: int) -> float:
    """Exact one-sided p-value P(Bin(n, 1/K) >= matches)."""
    if not 0 <= matches <= n:
        raise ValueError(f"matches must be in [0, {n}], got {matches}")
    return float(binom.sf(matches - 1, n, 1.0 / num_classes))


def _to_labels(out: object, n: int, k: int) -> np.ndarray:
    """Turn a query's output (scores (n, K) or labels (n,)) into int labels (n,)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    arr = np.asarray(out)
    if arr.ndim == 2 and arr.shape == (n, k):
        return arr.argmax(axis=1)
    if arr.ndim == 2 and arr.shape == (n, 1):
        arr = arr[:, 0]
    if arr.ndim == 1 and arr.shape[0] == n:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError("query returned non-integer labels")
        elif arr.dtype.kind not in "iub":
            raise ValueError(f"query returned labels of unsupported dtype {arr.dtype}")
        labels = arr.astype(np.int64)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
            raise ValueError(f"query returned labels outside 0..{k - 1}")
        return labels
    raise ValueError(f"query must return scores of shape ({n}, {k}) or labels of shape ({n},); got shape {arr.shape}")


def verify(
    query: Callable[[torch.Tensor | np.ndarray], np.ndarray | torch.Tensor],
    key: WatermarkKey,
    alpha: float = 1e-6,
    *,
    as_numpy: bool = False,
    indices: Sequence[int] | None = None,
) -> VerifyResult:
    """Black-box check: query the triggers once (a float32 batch), count label matches, exact binomial test."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x, y = trigger_set(key)
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0 or len(set(idx.tolist())) != idx.numel() or idx.min() < 0 or idx.max() >= key.n_triggers:
            raise ValueError(f"indices must be distinct and in [0, {key.n_triggers})")
        x, y = x[idx], y[idx]
    n, k = int(y.shape[0]), key.num_classes
    labels = _to_labels(query(x.numpy() if as_numpy else x), n, k)
    m = int((labels == y.numpy()).sum())
    p = p_value(m, n, k)
    detected = p <= alpha
    verdict = (
        f"{'WATERMARK DETECTED' if detected else 'not detected'}: {m}/{n} trigger matches "
        f"(chance 1/{k} -> {n / k:.1f} expected), exact binomial p = {p:.3g} {'<=' if detected else '>'} alpha = {alpha:g}"
    )
    return VerifyResult(matches=m, n=n, num_classes=k, p_value=p, alpha=float(alpha), detected=detected, verdict=verdict)


def verify_model(model: nn.Module, key: WatermarkKey, alpha: float = 1e-6, **kwargs: object) -> VerifyResult:
    """verify() against a local torch model (eval mode, no_grad; its train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(iter(model.parameters()), torch.empty(0)).device
            return verify(lambda x: model(torch.as_tensor(x).to(device)), key, alpha, **kwargs)  # type: ignore[arg-type]
    finally:
        model.train(was_training)


def verify_file(
    model_path: str | os.PathLike,
    key_path: str | os.PathLike,
    alpha: float = 1e-6,
    *,
    kind: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    hidden: Sequence[int] | None = None,
    sidecar: str | os.PathLike | None = None,
) -> VerifyResult:
    """Verify a saved state_dict; architecture from args, else the JSON sidecar (default <model>.json)."""
    from fedseek.train.models import build_model  # local import: keep watermark importable on its own

    model_path = Path(model_path)
    key = load_key(key_path)
    meta: dict = {}
    side = Path(sidecar) if sidecar is not None else model_path.with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"model sidecar {side} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"model sidecar {side} must hold a JSON object")
    elif sidecar is not None:
        raise FileNotFoundError(f"model sidecar not found: {side}")
    kind = kind if kind is not None else meta.get("kind")
    shape = tuple(input_shape if input_shape is not None else meta.get("input_shape", key.input_shape))
    classes = int(num_classes if num_classes is not None else meta.get("num_classes", key.num_classes))
    hid = tuple(hidden if hidden is not None else meta.get("hidden", (64,)))
    if kind is None:
        raise ValueError(f"model architecture unknown: pass kind= or provide the sidecar {side} with 'kind'")
    if math.prod(shape) != math.prod(key.input_shape) or classes != key.num_classes:
        raise ValueError(
            f"model (input_shape={shape}, num_classes={classes}) does not fit the key "
            f"(input_shape={key.input_shape}, num_classes={key.num_classes})"
        )
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{model_path} must hold a state_dict (a dict of tensors), got {type(state).__name__}")
    model = build_model(str(kind), shape, classes, hidden=hid, width=int(meta.get("width", 16)))
    model.load_state_dict(state, strict=True)
    return verify_model(model, key, alpha)
