"""A site's side of a round (run inside Flower's ClientApp): load data, check the privacy
ledger, train locally (DP-SGD when the site's policy says so), reply with weights + metrics.

In simulation the site's data is partition `partition-id` of the scenario's built-in dataset
and its state lives under OUT/sites/site-NNN; in deployment the node config names the site
config file (data path, privacy policy, state dir).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedseek.config import PrivacySpec, ScenarioConfig, load_scenario
from fedseek.models import build_model
from fedseek.train.local import evaluate, resolve_device, train_local
from fedseek.train.privacy import BudgetExceeded, DPRound, PrivacyLedger, noise_for_round, plan_round

log = logging.getLogger("fedseek.site")


@dataclass
class SiteRuntime:
    """Everything a site needs for a round, resolved from the node/run config."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    privacy: PrivacySpec | None
    state_dir: Path
    device: str


@functools.lru_cache(maxsize=4)
def _scenario(path: str, mtime: float) -> ScenarioConfig:
    return load_scenario(path)


@functools.lru_cache(maxsize=8)
def _partitions(path: str, mtime: float) -> tuple[Any, list[np.ndarray]]:
    from fedseek.data import load_builtin, partition_indices

    cfg = _scenario(path, mtime)
    train, _ = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)
    parts = partition_indices(
        train.y,
        cfg.num_sites,
        cfg.partition.scheme,
        alpha=cfg.partition.alpha,
        seed=cfg.seed,
        min_partition_size=cfg.partition.min_partition_size,
        groups=getattr(train, "groups", None),
    )
    return train, parts


def resolve_site(context: Context) -> SiteRuntime:
    """Simulation: partition of the scenario dataset; the run config names the scenario file."""
    rc, nc = context.run_config, context.node_config
    path = str(rc.get("config-path", ""))
    if not path:
        raise ValueError("run config 'config-path' is empty")
    mtime = os.path.getmtime(path)
    cfg = _scenario(path, mtime)
    pid = int(nc.get("partition-id", 0))
    train, parts = _partitions(path, mtime)
    idx = parts[pid]
    name = f"site-{pid:03d}"
    state_root = Path(str(rc.get("state-dir", "") or Path(str(rc.get("out-dir", "runs/latest"))) / "sites"))
    return SiteRuntime(
        name=name,
        x=train.x[idx],
        y=train.y[idx],
        num_classes=int(train.num_classes),
        privacy=cfg.privacy if (cfg.privacy and cfg.privacy.enabled) else None,
        state_dir=state_root / name,
        device=cfg.device,
    )


def _model_from(config: ConfigRecord, arrays: ArrayRecord) -> torch.nn.Module:
    meta = json.loads(str(config["model"]))
    model = build_model(meta["kind"], meta["input_shape"], int(meta["num_classes"]), meta.get("hidden", [64]))
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def handle_train(msg: Message, context: Context) -> Message:
    """One training round at a site; refusals (privacy budget) are normal replies with a status."""
    torch.set_num_threads(1)  # one core per virtual site; the engine runs several in parallel
    site = resolve_site(context)
    cfg = msg.content["config"]
    rnd = int(cfg["server-round"])
    run_id = str(cfg.get("run-id", context.run_id))
    epochs, batch = int(cfg["local-epochs"]), int(cfg["batch-size"])
    model = _model_from(cfg, msg.content["arrays"])
    device = resolve_device(site.device)

    dp = None
    ledger = None
    if site.privacy is not None:
        pol = site.privacy
        if pol.delta >= 1.0 / max(1, len(site.y)):
            return _refusal(msg, site, f"delta {pol.delta:g} is not below 1/n = {1.0 / len(site.y):.3g} for {len(site.y)} records", None)
        ledger = PrivacyLedger(site.state_dir, accountant=pol.accountant, delta=pol.delta, epsilon_budget=pol.epsilon_budget, site=site.name)
        q, steps = plan_round(len(site.y), batch, epochs)
        remaining = max(1, int(cfg.get("num-rounds", rnd)) - rnd + 1)
        try:
            noise = noise_for_round(pol, ledger, q, steps, remaining)
            projected = ledger.check(noise, q, steps, run_id=run_id, server_round=rnd)
        except BudgetExceeded as exc:
            ledger.save()
            return _refusal(msg, site, str(exc), ledger)
        dp = DPRound(pol, ledger, noise, run_id=run_id, server_round=rnd)
        log.info("site %s round %d: DP noise %.4f q %.4f steps %d -> epsilon %.4f", site.name, rnd, noise, q, steps, projected)

    result = train_local(
        model,
        site.x,
        site.y,
        num_classes=site.num_classes,
        epochs=epochs,
        lr=float(cfg["lr"]),
        batch_size=batch,
        momentum=float(cfg.get("momentum", 0.0)),
        device=device,
        seed=int(cfg.get("seed", 0)) * 100003 + rnd * 1009 + int(context.node_config.get("partition-id", 0)),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        weighting=str(cfg.get("weighting", "none")),
        privacy=dp,
    )
    metrics: dict[str, Any] = {
        "num-examples": int(result.num_examples),
        "train-loss": float(result.loss),
        "train-seconds": float(result.seconds),
        "steps": int(result.steps),
    }
    if result.dp:
        metrics.update(
            {
                "epsilon": result.dp["epsilon"],
                "delta": result.dp["delta"],
                "noise-multiplier": result.dp["noise_multiplier"],
                "sample-rate": result.dp["sample_rate"],
                "dp-steps": int(result.dp["dp_steps"]),
                "dp-steps-total": int(ledger.steps()) if ledger else 0,
                "epsilon-budget": float(site.privacy.epsilon_budget) if site.privacy else 0.0,
            }
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, site: SiteRuntime, reason: str, ledger: PrivacyLedger | None) -> Message:
    metrics: dict[str, Any] = {"num-examples": int(len(site.y))}
    if ledger is not None:
        metrics.update({"epsilon": ledger.epsilon(), "delta": ledger.delta, "epsilon-budget": ledger.epsilon_budget})
        if ledger.refusals:
            metrics["projected-epsilon"] = float(ledger.refusals[-1]["projected_epsilon"])
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site.name}),
            "status": ConfigRecord({"refused": reason}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's local data (federated evaluation)."""
    torch.set_num_threads(1)
    site = resolve_site(context)
    model = _model_from(msg.content["config"], msg.content["arrays"])
    m = evaluate(model, site.x, site.y, site.num_classes)
    metrics = {"num-examples": int(len(site.y)), "eval-loss": m["loss"], "eval-accuracy": m["accuracy"]}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
