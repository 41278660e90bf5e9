"""Distributed DP at a site: one clipped full-batch DP-SGD step per round with a share of the noise, sent only inside Flower's
SecAgg+ sum.

The site's update is n x (local - global) = -lr x (sum of its clipped per-record gradients + its noise share), so the mean
the coordinator unmasks, times K / N, is exactly one central DP-SGD step over all N records of the K sites, carrying the
noise of every share in it. Each site adds sigma / sqrt(min_sites - colluders) (its own policy), so any sum of at least
min_sites shares, less the colluders' own, holds noise sigma: what the ledger charges. The share alone is the site's local
floor (`local_floor_epsilon`): what it keeps if the secure sum is broken.

`secure_aggregation` wraps Flower's `secaggplus_mod`: it passes every other message through, refuses a protocol run that
cannot give the guarantee (fewer sampled or surviving sites than the site's min_sites, a key-share threshold not above its
colluders, a neighbourhood smaller than all sampled sites, a policy that is not distributed), and turns the site's own
refusals (budget spent) into error replies that name the reason, so the protocol treats the site as dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedseek.runtime.site_privacy import AUTO_STEP, policy_refusal, training_gate
from fedseek.runtime.site_runtime import SiteRuntime, resolve_site, scaled_rows, scaling_refusal, schema_refusal
from fedseek.wire.records import CONFIG, METRICS, SITE, RoundConfig, site_record

if TYPE_CHECKING:
    from fedseek.privacy import DPRound, PrivacyLedger

log = logging.getLogger("fedseek.site")
REFUSED = "refused: "  # error replies that carry a site's refusal (the coordinator excludes the site, as for a plain refusal)

__all__ = ["REFUSED", "handle_secure_train", "is_secure", "secure_aggregation"]


class Refused(Exception):
    """The site declines this secure round (its policy or its budget): the reason goes back in an error reply."""


def is_secure(msg: Message) -> bool:
    """A message of Flower's SecAgg+ protocol (its stage configuration is in the content)."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def secure_aggregation(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: run SecAgg+ for messages of the protocol (refusing runs that break the site's assumptions)."""
    if not is_secure(msg):
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    try:
        why = stage_refusal(resolve_site(ctxt), dict(msg.content.config_records[RECORD_KEY_CONFIGS]))
        if why is not None:
            raise Refused(why)
        return secaggplus_mod(msg, ctxt, call_next)
    except Refused as exc:
        log.warning("site refuses the secure round: %s", exc)
        return _error(msg, REFUSED + str(exc))


def stage_refusal(site: SiteRuntime, configs: dict[str, Any]) -> str | None:
    """Why this site will not take part in this stage of the protocol (None = go on)."""
    pol = site.privacy
    if pol is None or pol.mode != "distributed":
        return "this site's privacy policy is not mode distributed: it sends no update into a secure sum"
    need, colluders = pol.distributed.min_sites, pol.distributed.colluders
    stage = configs.get(Key.STAGE)
    try:
        if stage == Stage.SETUP:
            k, shares, threshold = int(configs[Key.SAMPLE_NUMBER]), int(configs[Key.SHARE_NUMBER]), int(configs[Key.THRESHOLD])
            if k < need:
                return f"the round samples {k} sites, fewer than this site's privacy.distributed.min_sites {need}"
            if shares != k:
                return (f"key shares go to {shares} of {k} sites: the site could not see how many sites survive "
                        "(fedseek runs SecAgg+ with every sampled site as a neighbour)")
            if threshold <= colluders:
                return f"key-share threshold {threshold} is not above the {colluders} colluders this site assumes"
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            alive = len(configs[Key.SOURCE_LIST]) + 1
            if alive < need:
                return f"only {alive} sites shared keys, fewer than this site's privacy.distributed.min_sites {need}"
        elif stage == Stage.UNMASK:
            alive = len(configs[Key.ACTIVE_NODE_ID_LIST])
            if alive < need:
                return (f"only {alive} sites' updates are in the sum, fewer than this site's privacy.distributed.min_sites {need}: "
                        "key shares withheld")
    except (KeyError, TypeError, ValueError) as exc:
        return f"malformed secure-aggregation message ({type(exc).__name__}: {exc})"
    return None


def distributed_recipe(site: SiteRuntime, cfg: RoundConfig) -> RoundConfig:
    """One clipped step on all the site's records (q = 1), lr x max_grad_norm = AUTO_STEP, no momentum or proximal term."""
    pol = site.privacy
    assert pol is not None
    return cfg.model_copy(update={"batch_size": max(1, len(site.y)), "local_epochs": 1, "momentum": 0.0,
                                  "lr": AUTO_STEP / pol.max_grad_norm, "proximal_mu": 0.0})


def handle_secure_train(msg: Message, context: Context) -> Message:
    """The training step inside SecAgg+ (its collect stage): the reply is a FitRes the mod masks, plus typed metrics."""
    site = resolve_site(context)
    cfg = distributed_recipe(site, RoundConfig.from_record(msg.content.config_records[CONFIG]))
    reason = schema_refusal(site, cfg.data_schema) or policy_refusal(site, cfg) or scaling_refusal(site, cfg.scaling)
    if reason is None and cfg.distill is not None:
        reason = "distill is not supported in distributed mode"
    if reason is not None:
        raise Refused(reason)
    with training_gate(site, cfg) as gate:
        if gate.refusal is not None:
            raise Refused(gate.refusal)
        assert gate.dp is not None and gate.ledger is not None
        return _secure_reply(msg, context, site, cfg, gate.dp, gate.ledger)


def _secure_reply(msg: Message, context: Context, site: SiteRuntime, cfg: RoundConfig, dp: DPRound, ledger: PrivacyLedger) -> Message:
    from fedseek.runtime.site import _train_metrics, load_global
    from fedseek.train.local import resolve_device, train_local

    model, global_arrays, mask = load_global(msg, cfg)
    x, y = scaled_rows(site, site.x, site.y, cfg.scaling)
    result = train_local(
        model, x, y, num_classes=site.num_classes, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.0,
        device=resolve_device(site.device), seed=0, weighting="none", privacy=dp, precision=site.precision, mask=mask,
        class_weights=site.privacy.class_weights if site.privacy is not None else None, task=cfg.model.task)
    local = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    n = len(y)
    values = [((local[k] - global_arrays[k]) * n).astype(np.float32) for k in global_arrays]  # -lr x (clipped sum + share)
    _note_clipping(context, values)
    dense = int(sum(v.nbytes for v in values))
    metrics = _train_metrics(result, dense, dense, site, ledger)
    metrics = metrics.model_copy(update={"local_epsilon": (result.dp or {}).get("local_epsilon")})
    fit = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(values), num_examples=1, metrics={})
    content = fitres_to_recorddict(fit, keep_input=False)  # weight 1: the site's value is already n x its step
    content[METRICS] = metrics.to_record()
    content[SITE] = site_record(site.name)
    return Message(content=content, reply_to=msg)


def _note_clipping(context: Context, values: list[np.ndarray]) -> None:
    """Log (here only: a count of the site's values is not a DP release) values SecAgg+ will clip to its range."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    bound = float(cast(float, state.get("clipping_range", 0.0))) if state is not None else 0.0
    if bound <= 0:
        return
    clipped = int(sum(int(np.count_nonzero(np.abs(v) > bound)) for v in values))
    if clipped:
        log.warning("secure aggregation clips %d of %d values to its range +-%g (raise secure_aggregation.clipping_range)",
                    clipped, sum(v.size for v in values), bound)
