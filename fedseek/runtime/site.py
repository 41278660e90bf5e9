"""A site's side of a round (inside Flower's ClientApp): check the privacy ledger, train locally (DP-SGD when
the site's policy says so), reply with the encoded update and typed metrics.

Refusals (budget spent, delta not below 1/n) are normal replies with a status, never errors.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from fedseek.files import atomic_write_bytes
from fedseek.runtime.site_eval import handle_evaluate
from fedseek.runtime.site_privacy import policy_refusal, site_recipe, training_gate
from fedseek.runtime.site_runtime import SiteRuntime, resolve_site, scaled_rows, scaling_refusal, schema_refusal
from fedseek.runtime.site_secure import handle_secure_train, is_secure
from fedseek.runtime.site_stats import handle_stats
from fedseek.train.local import TrainResult, distill_targets, resolve_device, teacher_logits, train_local
from fedseek.train.models import build_model
from fedseek.wire.codec import CodecSpec, ErrorFeedback, encode
from fedseek.wire.records import CONFIG, METRICS, SITE, RefusalMetrics, RoundConfig, TrainMetrics, refusal_content, site_record
from fedseek.wire.transfer import unpack_global, update_records

if TYPE_CHECKING:  # the privacy layer imports Opacus (~2 s): only sites that train under DP pay for it
    from fedseek.privacy import DPRound, PrivacyLedger

log = logging.getLogger("fedseek.site")
__all__ = ["handle_evaluate", "handle_query", "handle_stats", "handle_train"]
FEEDBACK_FILE = "error_feedback.npz"


def model_for(cfg: RoundConfig) -> torch.nn.Module:
    """The architecture the coordinator announced."""
    m = cfg.model
    return build_model(m.kind, tuple(m.input_shape), int(m.num_classes), m.hidden, width=m.width)


def load_global(msg: Message, cfg: RoundConfig) -> tuple[torch.nn.Module, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The global model of the round, as a module and as arrays, and its sparsity mask (if any)."""
    model = model_for(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays, mask = unpack_global(msg.content, shapes)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    return model, arrays, mask


def _load_feedback(state_dir: Path) -> ErrorFeedback:
    """The site's error-feedback residual (post-processing of its past DP releases), kept across rounds."""
    fb = ErrorFeedback()
    path = state_dir / FEEDBACK_FILE
    if path.exists():
        with np.load(path) as z:
            fb.load_state_dict({k: z[k] for k in z.files})
    return fb


def _save_feedback(state_dir: Path, fb: ErrorFeedback) -> None:
    buf = io.BytesIO()
    np.savez(buf, **fb.state_dict())  # type: ignore[arg-type]
    atomic_write_bytes(state_dir / FEEDBACK_FILE, buf.getvalue())


def handle_train(msg: Message, context: Context) -> Message:
    """One training round at a site: the site's own policy first, then (under DP) its locked, pre-charged ledger."""
    torch.set_num_threads(1)  # one core per virtual site; the engine runs several in parallel
    if is_secure(msg):  # distributed DP: the training step inside SecAgg+ (its mod masks the reply)
        return handle_secure_train(msg, context)
    site = resolve_site(context)
    cfg = site_recipe(site, RoundConfig.from_record(msg.content.config_records[CONFIG]))
    reason = schema_refusal(site, cfg.data_schema) or policy_refusal(site, cfg) or scaling_refusal(site, cfg.scaling)
    if reason is None and site.privacy is not None and site.privacy.mode == "distributed":
        reason = "privacy.mode distributed: this site sends updates only inside secure aggregation, and this round is not secure"
    teacher = None
    if reason is None and cfg.distill is not None:  # checked before the ledger is charged
        teacher, reason = load_teacher_record(msg, cfg)
    if reason is not None:
        return _refusal(msg, site, reason, None)
    if site.privacy is None:
        return _train_reply(msg, context, site, cfg, None, None, teacher)
    with training_gate(site, cfg) as gate:
        if gate.refusal is not None:
            return _refusal(msg, site, gate.refusal, gate.ledger)
        return _train_reply(msg, context, site, cfg, gate.dp, gate.ledger, teacher)


def load_teacher_record(msg: Message, cfg: RoundConfig) -> tuple[torch.nn.Module | None, str | None]:
    """distill: the teacher the coordinator sent (its architecture in the round config, its weights beside the model), or why not."""
    from fedseek.runtime.distillation import TEACHER_RECORD
    from fedseek.serving.teacher import module_from
    from fedseek.wire.transfer import from_record

    assert cfg.distill is not None
    t = cfg.distill.teacher
    if list(t.input_shape) != list(cfg.model.input_shape) or t.num_classes != cfg.model.num_classes:
        return None, "distill: the teacher's inputs or classes differ from the model's"
    if TEACHER_RECORD not in msg.content.array_records:
        return None, "distill: the round asks for distillation but carries no teacher weights"
    try:
        return module_from(t, from_record(msg.content.array_records[TEACHER_RECORD])), None
    except (ValueError, RuntimeError) as exc:
        return None, f"distill: {exc}"


def _train_reply(msg: Message, context: Context, site: SiteRuntime, cfg: RoundConfig, dp: DPRound | None,
                 ledger: PrivacyLedger | None, teacher: torch.nn.Module | None = None) -> Message:
    """Train on the site's training records (never the held-out ones) and reply with the encoded delta and typed metrics.

    With a teacher (distill), the targets are the labels and the teacher's logits on the same records, computed
    here: they never leave the site, and DP-SGD clips each record's whole loss, so the round costs what any round costs.
    """
    model, global_arrays, mask = load_global(msg, cfg)
    x, y = scaled_rows(site, site.x, site.y, cfg.scaling)
    if teacher is not None and cfg.distill is not None:
        y = distill_targets(y, teacher_logits(teacher, x))
    # Without DP the run seed makes training reproducible; under DP batch choice and noise come from the site's CSPRNG.
    seed = cfg.seed * 100003 + cfg.server_round * 1009 + int(context.node_config.get("partition-id", 0))
    result = train_local(
        model, x, y, num_classes=site.num_classes, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
        momentum=cfg.momentum, device=resolve_device(site.device), seed=seed, proximal_mu=cfg.proximal_mu,
        weighting=cfg.weighting if dp is None else "none", privacy=dp, precision=site.precision, mask=mask,
        class_weights=site.privacy.class_weights if site.privacy is not None else None, task=cfg.model.task,
        distill=(cfg.distill.alpha, cfg.distill.temperature) if teacher is not None and cfg.distill is not None else None)
    # The delta is a DP release (when DP is on): encoding it is post-processing.
    local = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    delta = {k: local[k] - global_arrays[k] for k in global_arrays}
    spec = CodecSpec(**cfg.codec)
    feedback = _load_feedback(site.state_dir) if spec.error_feedback else None
    enc = encode(delta, spec, feedback, mask=mask, nonce=cfg.server_round)
    if feedback is not None:
        _save_feedback(site.state_dir, feedback)
    metrics = _train_metrics(result, enc.nbytes, enc.dense_nbytes, site, ledger)
    content = RecordDict({**update_records(enc), METRICS: metrics.to_record(), SITE: site_record(site.name)})
    return Message(content=content, reply_to=msg)


def _train_metrics(result: TrainResult, payload: int, dense: int, site: SiteRuntime, ledger: PrivacyLedger | None) -> TrainMetrics:
    dp = result.dp or {}
    # Under DP the raw training loss is NOT released: it is an unnoised function of the training records.
    return TrainMetrics(
        num_examples=int(result.num_examples), train_loss=None if dp else float(result.loss),
        train_seconds=float(result.seconds), steps=int(result.steps),
        payload_bytes=int(payload), dense_bytes=int(dense),
        epsilon=dp.get("epsilon"), delta=dp.get("delta"), noise_multiplier=dp.get("noise_multiplier"), sample_rate=dp.get("sample_rate"),
        dp_steps=int(dp["dp_steps"]) if dp else None, dp_steps_total=int(ledger.steps()) if (dp and ledger) else (0 if dp else None),
        epsilon_budget=float(site.privacy.epsilon_budget) if (dp and site.privacy) else (0.0 if dp else None))


def _refusal(msg: Message, site: SiteRuntime, reason: str, ledger: PrivacyLedger | None) -> Message:
    metrics = RefusalMetrics(num_examples=int(len(site.y)))
    if ledger is not None:
        projected = float(ledger.refusals[-1]["projected_epsilon"]) if ledger.refusals else None
        metrics = RefusalMetrics(num_examples=int(len(site.y)), epsilon=ledger.epsilon(), delta=ledger.delta,
                                 epsilon_budget=ledger.epsilon_budget, projected_epsilon=projected)
    return Message(content=refusal_content(reason, metrics, site.name), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Identify this site (the coordinator maps node ids to stable site names with it)."""
    site = resolve_site(context)
    return Message(content=RecordDict({SITE: site_record(site.name)}), reply_to=msg)
