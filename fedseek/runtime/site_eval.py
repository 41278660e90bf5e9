"""Private federated evaluation at a site: the global model on the site's held-out split, released as counts.

Never on training records. Under DP the release is a Gaussian mechanism on (per-class count,
per-class correct count, clipped loss sum / loss_clip): one record moves each by at most 1, so
the L2 sensitivity is sqrt(3) and the noise std is sigma*sqrt(3) (times loss_clip for the loss
sum). sigma is calibrated so the site's planned number of evaluations fits its evaluation
budget, and every release is charged to the separate evaluation ledger before it is computed.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from fedseek.privacy.sampling import secure_uniform
from fedseek.runtime.site_privacy import open_ledger
from fedseek.runtime.site_runtime import SiteRuntime, resolve_site, scaled_rows, scaling_refusal, schema_refusal
from fedseek.train.local import predict_scores, predict_values
from fedseek.train.models import build_model
from fedseek.wire.records import CONFIG, METRICS, SITE, EvalConfig, EvalMetrics, RefusalMetrics, refusal_content, site_record
from fedseek.wire.transfer import unpack_global

log = logging.getLogger("fedseek.site")
SENSITIVITY = math.sqrt(3.0)


def holdout_counts(scores: np.ndarray, y: np.ndarray, num_classes: int, loss_clip: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact per-class counts, per-class correct predictions and the clipped cross-entropy sum on the held-out split."""
    pred = scores.argmax(1) if len(y) else np.zeros(0, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)[:num_classes]
    correct = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)[:num_classes]
    losses = -np.log(np.clip(scores[np.arange(len(y)), y], 1e-12, 1.0)) if len(y) else np.zeros(0)
    return counts, correct, float(np.minimum(losses, loss_clip).sum())


def regression_sums(pred: np.ndarray, y: np.ndarray, loss_clip: float) -> np.ndarray:
    """The four normalised sums a regression site releases (each record moves each by at most 1): squared and absolute
    errors and the target and its square, clipped at loss_clip (squares) and sqrt(loss_clip), divided by those bounds."""
    e = np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    t, root = np.asarray(y, dtype=np.float64), math.sqrt(loss_clip)
    return np.array([np.minimum(e**2, loss_clip).sum() / loss_clip, np.minimum(np.abs(e), root).sum() / root,
                     np.clip(t, -root, root).sum() / root, np.minimum(t**2, loss_clip).sum() / loss_clip])


def secure_normal(n: int) -> np.ndarray:
    """n standard normal draws from the OS CSPRNG (Box-Muller over os.urandom uniforms)."""
    u = secure_uniform(2 * n).reshape(2, n)
    return np.sqrt(-2.0 * np.log1p(-u[0])) * np.cos(2.0 * math.pi * u[1])


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out split; under DP release noisy counts charged to the evaluation ledger."""
    torch.set_num_threads(1)
    site = resolve_site(context)
    cfg = EvalConfig.from_record(msg.content.config_records[CONFIG])
    reason = schema_refusal(site, cfg.data_schema) or scaling_refusal(site, cfg.scaling)
    if reason is not None:
        return _refuse(msg, site, reason)
    if site.y_eval is None or len(site.y_eval) == 0:
        return _refuse(msg, site, "no held-out evaluation split at this site (holdout_fraction is 0): training records are never evaluated")
    meta = cfg.model
    model = build_model(meta.kind, tuple(meta.input_shape), int(meta.num_classes), meta.hidden, width=meta.width)
    arrays, _ = unpack_global(msg.content, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    clip = site.privacy.evaluation.loss_clip if site.privacy is not None else 50.0
    assert site.x_eval is not None
    x_eval, y_eval = scaled_rows(site, site.x_eval, site.y_eval, cfg.scaling)
    if cfg.model.task == "regression":
        return _regression(msg, site, cfg, regression_sums(predict_values(model, x_eval), y_eval, clip), clip)
    counts, correct, loss_sum = holdout_counts(predict_scores(model, x_eval), site.y_eval, site.num_classes, clip)
    if site.privacy is None:
        out = EvalMetrics(num_examples=len(site.y_eval), class_counts=counts.tolist(), class_correct=correct.tolist(),
                          loss_sum=loss_sum, loss_clip=clip, noise_std=0.0)
        return _reply(msg, site, out)
    return _private_release(msg, site, cfg, counts, correct, loss_sum, clip)


def _regression(msg: Message, site: SiteRuntime, cfg: EvalConfig, sums: np.ndarray, clip: float) -> Message:
    """A regression site's evaluation: the four normalised sums, exact, or under DP with noise charged to the evaluation ledger."""
    n = len(site.y_eval) if site.y_eval is not None else 0
    if site.privacy is None:
        return _reply(msg, site, EvalMetrics(num_examples=n, class_counts=[float(n)], class_correct=[0.0], loss_sum=float(sums[0] * clip),
                                             loss_clip=clip, target_sums=sums.tolist(), noise_std=0.0))
    charged = _charge(msg, site, cfg)
    if isinstance(charged, Message):
        return charged
    sigma, eps, ledger = charged
    std = float(sigma) * 2.0  # four sums, each moved by at most 1: L2 sensitivity 2
    noisy = sums + secure_normal(4) * std
    log.info("site %s regression evaluation round %d: sigma %.3f (noise std %.3f) -> evaluation epsilon %.4f", site.name,
             cfg.server_round, sigma, std, eps)
    return _reply(msg, site, EvalMetrics(num_examples=n, class_counts=[float(n)], class_correct=[0.0], loss_sum=float(noisy[0] * clip),
                                         loss_clip=clip, target_sums=noisy.tolist(), noise_std=std, epsilon=eps, delta=ledger.delta,
                                         epsilon_budget=ledger.epsilon_budget))


def _charge(msg: Message, site: SiteRuntime, cfg: EvalConfig) -> tuple[float, float, Any] | Message:
    """Charge one Gaussian release to the evaluation ledger (under its lock): (sigma, epsilon after, ledger), or the refusal."""
    from fedseek.privacy import BudgetExceeded, LedgerError

    pol = site.privacy
    assert pol is not None
    try:
        ledger = open_ledger(site, "evaluation")
        with ledger.lock():
            remaining = max(1, pol.evaluation.planning_releases - ledger.rounds_charged())
            sigma = ledger.calibrated_noise
            if sigma is None or ledger.projected_epsilon(sigma, 1.0, remaining) > ledger.epsilon_budget:
                sigma = ledger.calibrated_noise = ledger.calibrate_noise(1.0, 1, remaining)
            ledger.check(sigma, 1.0, 1, run_id=cfg.run_id, server_round=cfg.server_round)
            eps = ledger.charge(sigma, 1.0, 1, run_id=cfg.run_id, server_round=cfg.server_round)
    except BudgetExceeded as exc:
        return _refuse(msg, site, f"evaluation: {exc}", ledger)
    except LedgerError as exc:
        return _refuse(msg, site, f"evaluation ledger: {exc}")
    return float(sigma), float(eps), ledger


def _private_release(msg: Message, site: SiteRuntime, cfg: EvalConfig, counts: np.ndarray, correct: np.ndarray, loss_sum: float,
                     clip: float) -> Message:
    """Charge one Gaussian release to the evaluation ledger (under its lock), then add the noise it paid for."""
    charged = _charge(msg, site, cfg)
    if isinstance(charged, Message):
        return charged
    sigma, eps, ledger = charged
    std = float(sigma) * SENSITIVITY
    k = len(counts)
    z = secure_normal(2 * k + 1) * std
    log.info("site %s evaluation round %d: sigma %.3f (count noise std %.3f) -> evaluation epsilon %.4f", site.name,
             cfg.server_round, sigma, std, eps)
    out = EvalMetrics(num_examples=len(site.y_eval) if site.y_eval is not None else 0, class_counts=(counts + z[:k]).tolist(),
                      class_correct=(correct + z[k:2 * k]).tolist(), loss_sum=float(loss_sum + clip * z[2 * k]), loss_clip=clip,
                      noise_std=std, epsilon=eps, delta=ledger.delta, epsilon_budget=ledger.epsilon_budget)
    return _reply(msg, site, out)


def _reply(msg: Message, site: SiteRuntime, metrics: EvalMetrics) -> Message:
    return Message(content=RecordDict({METRICS: metrics.to_record(), SITE: site_record(site.name)}), reply_to=msg)


def _refuse(msg: Message, site: SiteRuntime, reason: str, ledger: object = None) -> Message:
    metrics = RefusalMetrics(num_examples=int(len(site.y_eval)) if site.y_eval is not None else 0)
    if ledger is not None:
        metrics = RefusalMetrics(num_examples=metrics.num_examples, epsilon=ledger.epsilon(), delta=ledger.delta,  # type: ignore[attr-defined]
                                 epsilon_budget=ledger.epsilon_budget)  # type: ignore[attr-defined]
    log.warning("site %s refuses evaluation: %s", site.name, reason)
    return Message(content=refusal_content(reason, metrics, site.name), reply_to=msg)
