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

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from fedseek.privacy.sampling import secure_uniform
from fedseek.runtime.site_privacy import open_ledger
from fedseek.runtime.site_runtime import SiteRuntime, resolve_site, scaled_rows, scaling_refusal, schema_refusal
from fedseek.train.local import predict_scores
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
    if cfg.model.task == "regression":
        return _refuse(msg, site, "the private federated evaluation releases per-class counts; it is not built for regression")
    if site.y_eval is None or len(site.y_eval) == 0:
        return _refuse(msg, site, "no held-out evaluation split at this site (holdout_fraction is 0): training records are never evaluated")
    meta = cfg.model
    model = build_model(meta.kind, tuple(meta.input_shape), int(meta.num_classes), meta.hidden)
    arrays, _ = unpack_global(msg.content, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    clip = site.privacy.evaluation.loss_clip if site.privacy is not None else 50.0
    assert site.x_eval is not None
    x_eval, _ = scaled_rows(site, site.x_eval, site.y_eval, cfg.scaling)
    counts, correct, loss_sum = holdout_counts(predict_scores(model, x_eval), site.y_eval, site.num_classes, clip)
    if site.privacy is None:
        out = EvalMetrics(num_examples=len(site.y_eval), class_counts=counts.tolist(), class_correct=correct.tolist(),
                          loss_sum=loss_sum, loss_clip=clip, noise_std=0.0)
        return _reply(msg, site, out)
    return _private_release(msg, site, cfg, counts, correct, loss_sum, clip)


def _private_release(msg: Message, site: SiteRuntime, cfg: EvalConfig, counts: np.ndarray, correct: np.ndarray, loss_sum: float,
                     clip: float) -> Message:
    """Charge one Gaussian release to the evaluation ledger (under its lock), then add the noise it paid for."""
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
