"""A site's local training loop (plain SGD or Opacus DP-SGD) and model evaluation."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedseek.names import PRECISIONS
from fedseek.train.models import seed_torch

# Opacus' ghost clipping fires full backward hooks on modules whose inputs need no grad: harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(name)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """'Balanced' class weights n/(K*count); Poisson sampling forbids weighted samplers, so weight the loss."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    return torch.tensor(len(y) / (num_classes * counts), dtype=torch.float32)


def check_precision(precision: str, device: torch.device, *, private: bool) -> torch.dtype | None:
    """Autocast dtype for a precision policy, or a clear error for an unsupported combination."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (CPU fp16 is slow and unsupported); use bf16 on CPU")
        if private:
            raise ValueError("precision fp16 is not supported with DP-SGD: GradScaler breaks per-sample clipping; use bf16")
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")


@dataclass
class TrainResult:
    """What one local round produced (before encoding)."""

    loss: float
    num_examples: int
    steps: int
    seconds: float
    dp: dict[str, float] = field(default_factory=dict)


def _tensors(x: np.ndarray, y: np.ndarray, regression: bool = False) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32 if regression else torch.long))


class RegressionLoss(nn.Module):
    """Mean squared error of the model's one output against the target.

    It keeps a `reduction` attribute because Opacus' ghost clipping switches it to "none" to get
    one loss per record (shape (N,), as per-sample clipping needs).
    """

    def __init__(self, reduction: str = "mean") -> None:
        """`reduction`: mean (training), sum or none."""
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE between out (N, 1) and target (N,)."""
        return nn.functional.mse_loss(out.reshape(-1), target.reshape(-1).to(out.dtype), reduction=self.reduction)


class DistillLoss(nn.Module):
    """Knowledge distillation from a teacher's logits: a * CE(label) + (1 - a) * T^2 * KL(teacher_T || student_T).

    The target packs, per record, its label in column 0 and the teacher's logits for that record
    after it, so a record's loss depends on that record alone (per-sample clipping stays exact)
    and Poisson sampling draws label and teacher answer together. Like RegressionLoss it keeps a
    `reduction` attribute, which Opacus' ghost clipping sets to "none".
    """

    def __init__(self, alpha: float, temperature: float, weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        """`alpha` weighs the hard-label cross-entropy, `temperature` softens both distributions."""
        super().__init__()
        if not (0.0 <= alpha <= 1.0) or temperature <= 0:
            raise ValueError(f"distillation needs 0 <= alpha <= 1 and temperature > 0 (got {alpha}, {temperature})")
        self.alpha, self.temperature, self.weight, self.reduction = float(alpha), float(temperature), weight, reduction

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-record loss reduced by `reduction`; out (N, K) student logits, target (N, 1 + K)."""
        out = out.float()
        labels, teacher = target[:, 0].long(), target[:, 1:].to(out.dtype)
        t = self.temperature
        ce = nn.functional.cross_entropy(out, labels, weight=self.weight, reduction="none")
        log_p = nn.functional.log_softmax(out / t, dim=1)
        log_q = nn.functional.log_softmax(teacher / t, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1) * (t * t)
        loss = self.alpha * ce + (1.0 - self.alpha) * kl
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


def distill_targets(y: np.ndarray, teacher_logits: np.ndarray) -> np.ndarray:
    """Pack labels and the teacher's logits into the (N, 1 + K) float target DistillLoss reads."""
    if len(teacher_logits) != len(y) or teacher_logits.ndim != 2:
        raise ValueError(f"teacher logits of shape {teacher_logits.shape} for {len(y)} labels")
    return np.concatenate([np.asarray(y, dtype=np.float32)[:, None], np.asarray(teacher_logits, dtype=np.float32)], axis=1)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The teacher's raw logits for x on the CPU (the site's own records: computed locally, never released)."""
    teacher.eval()
    out = [teacher(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32)).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], lr: float, mu: float) -> None:
    """FedProx as a decoupled proximal step w -= lr*mu*(w - w_global): data-independent, so DP-safe."""
    with torch.no_grad():
        for p, g in zip((p for p in model.parameters() if p.requires_grad), global_params, strict=False):
            p.sub_(lr * mu * (p - g))


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    proximal_mu: float = 0.0,
    weighting: str = "none",
    privacy: Any = None,
    precision: str = "fp32",
    mask: dict[str, np.ndarray] | None = None,
    class_weights: list[float] | None = None,
    task: str = "classification",
    distill: tuple[float, float] | None = None,
) -> TrainResult:
    """Train `model` in place on (x, y) for `epochs`; with `privacy` (a DPRound) under Opacus DP-SGD.

    `precision` bf16/fp16 runs forward and loss under torch.autocast with fp32 master weights;
    `mask` (public) keeps pruned weights exactly zero and their gradients and noise off.
    `seed` makes non-DP runs reproducible; under DP nothing random derives from it (the coordinator knows it).
    `class_weights` (fixed, from the site's policy) weight the loss instead of `weighting`.
    `task` regression trains the one output on the float target with mean squared error.
    `distill` (alpha, temperature): y is distill_targets(labels, teacher logits) and the loss is DistillLoss.
    """
    device = torch.device(device)
    amp_dtype = check_precision(precision, device, private=privacy is not None)
    seed_torch(seed if privacy is None else int.from_bytes(os.urandom(8), "little"), device)
    model.to(device)
    model.train()
    start = time.perf_counter()
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    regression = task == "regression"
    labels = y[:, 0].astype(np.int64) if distill is not None else y
    weights = None if regression else _loss_weights(labels, num_classes, weighting, class_weights)
    criterion, optimizer, loader = _sgd_setup(model, x, y, lr, batch_size, momentum, seed, weights, device, regression, distill)
    train_model, optimizer, criterion, loader, enforcer = _wrap(model, optimizer, criterion, loader, privacy, mask)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    total_loss, total_n, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch; Opacus still steps (noise only)
                steps += _empty_batch(privacy, train_model, optimizer, criterion, xb, yb, device)
                continue
            loss = _step(train_model, optimizer, criterion, scaler, xb.to(device), yb.to(device), amp_dtype)
            steps += 1
            if proximal_mu > 0:
                _proximal_step(model, global_params, lr, proximal_mu)
            total_loss += loss * len(yb)
            total_n += len(yb)
    if enforcer is not None:
        enforcer.detach()
    dp_info = privacy.finish(steps) if privacy is not None else {}
    return TrainResult(loss=total_loss / max(total_n, 1), num_examples=int(len(y)), steps=steps,
                       seconds=time.perf_counter() - start, dp=dp_info)


def _loss_weights(y: np.ndarray, num_classes: int, weighting: str, fixed: list[float] | None) -> torch.Tensor | None:
    """Fixed per-class weights from the site's policy, else 'balanced' from the labels (non-DP only), else none."""
    if fixed is not None:
        if len(fixed) != num_classes:
            raise ValueError(f"class_weights has {len(fixed)} values for {num_classes} classes")
        return torch.tensor(fixed, dtype=torch.float32)
    return class_weights(y, num_classes) if weighting == "balanced" else None


def _sgd_setup(
    model: nn.Module, x: np.ndarray, y: np.ndarray, lr: float, batch_size: int, momentum: float,
    seed: int, weights: torch.Tensor | None, device: torch.device, regression: bool = False,
    distill: tuple[float, float] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """The (class-weighted) loss, MSE or distillation loss, plain SGD over the trainable parameters, and a seeded shuffling loader
    (replaced under DP)."""
    w = weights.to(device) if weights is not None else None
    criterion: nn.Module
    if distill is not None:
        criterion = DistillLoss(distill[0], distill[1], weight=w)
    else:
        criterion = RegressionLoss() if regression else nn.CrossEntropyLoss(weight=w)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(_tensors(x, y, regression or distill is not None), batch_size=min(batch_size, len(y)), shuffle=True, generator=gen)
    return criterion, optimizer, loader


def _empty_batch(privacy: Any, model: nn.Module, optimizer: Any, criterion: nn.Module, xb: Any, yb: Any, device: torch.device) -> int:
    """An empty Poisson batch: under DP it is still a (noise-only) step; without DP nothing happens. Returns steps taken."""
    if privacy is None:
        return 0
    optimizer.zero_grad(set_to_none=True)
    privacy.empty_step(model, optimizer, criterion, xb, yb, device)
    return 1


def _wrap(model: nn.Module, optimizer: Any, criterion: nn.Module, loader: Any, privacy: Any,
          mask: dict[str, np.ndarray] | None) -> tuple[nn.Module, Any, nn.Module, Any, Any]:
    """Opacus' wrappers when training under DP (a DPRound), then the sparsity mask's enforcer when there is a mask."""
    train_model: nn.Module = model
    if privacy is not None:
        train_model, optimizer, criterion, loader = privacy.wrap(model, optimizer, criterion, loader)
    enforcer = None
    if mask:
        from fedseek.sparsity import enforce_mask

        enforcer = enforce_mask(train_model, optimizer, mask)
    return train_model, optimizer, criterion, loader, enforcer


def _step(model: nn.Module, optimizer: Any, criterion: nn.Module, scaler: Any, xb: torch.Tensor, yb: torch.Tensor,
          amp_dtype: torch.dtype | None) -> float:
    """One optimizer step (autocast forward when mixed precision, loss scaling for fp16); returns the batch loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=xb.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(xb)
    loss = criterion(out.float(), yb)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_scores(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 1024) -> np.ndarray:
    """Softmax class scores for x (the black-box view of a model)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device)
        out.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def predict_values(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 1024) -> np.ndarray:
    """A regression model's one output per row, in the units it was trained in."""
    model.eval()
    out = [model(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device)).float().reshape(-1).cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MSE (as `loss`), MAE, RMSE and R^2 (1 - SSE/SST; nan when the target is constant) of predictions against targets."""
    y = np.asarray(y, dtype=np.float64)
    if not len(y):
        return {"loss": float("nan"), "mae": float("nan"), "rmse": float("nan"), "r2": float("nan")}
    err = np.asarray(pred, dtype=np.float64) - y
    mse = float(np.mean(err**2))
    sst = float(np.sum((y - y.mean()) ** 2))
    return {"loss": mse, "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(mse)),
            "r2": float(1.0 - np.sum(err**2) / sst) if sst > 0 else float("nan")}


def evaluate_regression(model: nn.Module, x: np.ndarray, y: np.ndarray, target_scale: tuple[float, float] | None = None,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Regression metrics in the target's own units (predictions and targets mapped back by `target_scale`)."""
    pred = predict_values(model, x, device)
    y = np.asarray(y, dtype=np.float64)
    if target_scale is not None:
        mean, std = target_scale
        pred, y = pred * std + mean, y * std + mean
    return regression_metrics(pred, y)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Loss, accuracy and balanced accuracy; ROC AUC for binary tasks (accuracy misleads on rare fraud)."""
    scores = predict_scores(model, x, device)
    y = np.asarray(y)
    eps = 1e-12
    loss = float(-np.mean(np.log(scores[np.arange(len(y)), y] + eps))) if len(y) else float("nan")
    pred = scores.argmax(1)
    out = {"loss": loss, "accuracy": float((pred == y).mean()) if len(y) else float("nan")}
    recalls = [float((pred[y == k] == k).mean()) for k in range(num_classes) if (y == k).any()]
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")
    if num_classes == 2 and len(np.unique(y)) == 2:
        from sklearn.metrics import roc_auc_score

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["auc"] = float(roc_auc_score(y, scores[:, 1]))
    return out
