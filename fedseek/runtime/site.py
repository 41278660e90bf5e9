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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedseek.config import PrivacySpec, ScenarioConfig, SiteConfig, load_scenario, load_site
from fedseek.files import atomic_write_bytes
from fedseek.privacy.ledger import BF16_NORM_SLACK, BudgetExceeded, DPRound, PrivacyLedger, noise_for_round, plan_round
from fedseek.train.local import evaluate, resolve_device, train_local
from fedseek.train.models import build_model
from fedseek.wire.codec import CodecSpec, ErrorFeedback
from fedseek.wire.transfer import encode_update, unpack_global, update_records

log = logging.getLogger("fedseek.runtime.site")
FEEDBACK_FILE = "error_feedback.npz"
NAN_MARK = np.float32(-1.2345e-30)  # fault injection only: marks a delta whose payload is replaced by NaN


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
    num_sites: int = 1
    precision: str = "fp32"
    faults: Any = None  # FaultSpec in simulations: drop-outs and Byzantine behaviour
    fault_seed: int = 0
    index: int = 0


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


def load_site_data(cfg: SiteConfig) -> Any:
    """A deployed site's training data (fedseek.data.ArrayDataset) as its config says; DataError/ValueError in one line."""
    from fedseek.data import load_builtin, load_image_folder, load_table, partition_indices

    d = cfg.data
    if d.builtin is not None:
        train, _ = load_builtin(d.builtin, d.seed, test_fraction=d.test_fraction, **d.options)
        parts = partition_indices(train.y, int(d.num_partitions or 1), d.scheme, alpha=d.alpha, seed=d.seed,
                                  min_partition_size=d.min_partition_size, groups=getattr(train, "groups", None))
        return train.subset(parts[int(d.partition or 0)])
    if d.image_size is not None:
        return load_image_folder(str(d.path), d.image_size, grayscale=d.grayscale, classes=d.classes)
    return load_table(str(d.path), str(d.label_column), d.feature_columns, standardize=d.standardize, classes=d.classes)


@functools.lru_cache(maxsize=4)
def _site_config(path: str, mtime: float) -> SiteConfig:
    return load_site(path)


@functools.lru_cache(maxsize=4)
def _deployed_site(path: str, mtime: float, data_mtime: float) -> SiteRuntime:
    """A site daemon's runtime from its YAML (cached per process on the config's and the data's mtime)."""
    cfg = _site_config(path, mtime)
    ds = load_site_data(cfg)
    return SiteRuntime(
        name=cfg.name,
        x=ds.x,
        y=ds.y,
        num_classes=int(ds.num_classes),
        privacy=cfg.privacy if (cfg.privacy and cfg.privacy.enabled) else None,
        state_dir=Path(str(cfg.state_dir)),
        device=cfg.device,
        precision=cfg.precision,
        index=int(cfg.data.partition or 0),
    )


def resolve_site(context: Context) -> SiteRuntime:
    """Deployment: the node config's `site-config` names the site YAML. Simulation: a partition of the scenario dataset."""
    rc, nc = context.run_config, context.node_config
    if nc.get("site-config"):
        site_path = str(nc["site-config"])
        cfg = _site_config(site_path, os.path.getmtime(site_path))
        data_mtime = os.path.getmtime(cfg.data.path) if cfg.data.path else 0.0
        return _deployed_site(site_path, os.path.getmtime(site_path), data_mtime)
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
        precision=cfg.precision,
        faults=cfg.faults,
        num_sites=cfg.num_sites,
        fault_seed=cfg.seed,
        index=pid,
    )


def _model_from(config: ConfigRecord) -> torch.nn.Module:
    meta = json.loads(str(config["model"]))
    return build_model(meta["kind"], meta["input_shape"], int(meta["num_classes"]), meta.get("hidden", [64]))


def _load_feedback(state_dir: Path) -> ErrorFeedback:
    """The site's error-feedback residual (post-processing of its past DP releases), kept across rounds."""
    fb = ErrorFeedback()
    path = state_dir / FEEDBACK_FILE
    if path.exists():
        with np.load(path) as z:
            fb.load_state_dict({k: z[k] for k in z.files})
    return fb


def _save_feedback(state_dir: Path, fb: ErrorFeedback) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **fb.state_dict())
    atomic_write_bytes(state_dir / FEEDBACK_FILE, buf.getvalue())


def handle_train(msg: Message, context: Context) -> Message:
    """One training round at a site; refusals (privacy budget) are normal replies with a status."""
    torch.set_num_threads(1)  # one core per virtual site; the engine runs several in parallel
    site = resolve_site(context)
    cfg = msg.content["config"]
    rnd = int(cfg["server-round"])
    run_id = str(cfg.get("run-id", context.run_id))
    epochs, batch = int(cfg["local-epochs"]), int(cfg["batch-size"])
    model = _model_from(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    global_arrays, mask = unpack_global(msg.content, shapes)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_arrays.items()})
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
        slack = BF16_NORM_SLACK if site.precision == "bf16" else 1.0
        dp = DPRound(pol, ledger, noise, run_id=run_id, server_round=rnd, slack=slack)
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
        precision=site.precision,
        mask=mask,
    )
    # The delta is a DP release (when DP is on): encoding it is post-processing.
    local = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    delta = {k: local[k] - global_arrays[k] for k in global_arrays}
    delta = _misbehave(site, rnd, delta)
    spec = CodecSpec(**json.loads(str(cfg.get("codec", "{}"))))
    feedback = _load_feedback(site.state_dir) if spec.error_feedback else None
    corrupt = all(np.all(v == NAN_MARK) for v in delta.values())
    if corrupt:  # a Byzantine site sending NaN: our encoder refuses non-finite values, a hostile one would not
        spec, feedback = CodecSpec(), None
    enc = encode_update(delta, spec, feedback, mask, nonce=rnd)
    if corrupt:
        enc.arrays = {k: np.full_like(v, np.nan) for k, v in enc.arrays.items()}
    records, payload, dense = update_records(enc), enc.nbytes, enc.dense_nbytes
    if feedback is not None:
        _save_feedback(site.state_dir, feedback)
    metrics: dict[str, Any] = {
        "num-examples": int(result.num_examples),
        "train-loss": float(result.loss),
        "train-seconds": float(result.seconds),
        "steps": int(result.steps),
        "payload-bytes": int(payload),
        "dense-bytes": int(dense),
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
    content = RecordDict({**records, "metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def byzantine_sites(num_sites: int, fraction: float, seed: int) -> set[int]:
    """Which simulated sites misbehave: a seeded choice, the same in every run with that seed."""
    k = int(round(fraction * num_sites))
    if k <= 0:
        return set()
    return {int(i) for i in np.random.default_rng([seed, 0xB12]).choice(num_sites, size=k, replace=False)}


def _misbehave(site: SiteRuntime, rnd: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Simulation fault injection: drop out this round, or corrupt the update (Byzantine site)."""
    f = site.faults
    if f is None:
        return delta
    rng = np.random.default_rng([site.fault_seed, rnd, site.index, 0xD20])
    if f.dropout_rate > 0 and rng.random() < f.dropout_rate:
        raise RuntimeError(f"simulated drop-out of {site.name} in round {rnd}")
    byz = f.byzantine
    bad = sorted(byzantine_sites(site.num_sites, byz.fraction, site.fault_seed)) if byz.fraction > 0 else []
    if site.index not in bad:
        return delta
    attacks = byz.attack if isinstance(byz.attack, list) else [byz.attack]
    attack = attacks[bad.index(site.index) % len(attacks)]
    log.info("site %s is Byzantine (%s) in round %d", site.name, attack, rnd)
    if attack == "sign_flip":
        return {k: -byz.scale * v for k, v in delta.items()}
    if attack == "scale":
        return {k: byz.scale * v for k, v in delta.items()}
    if attack == "noise":
        return {k: v + rng.normal(0.0, byz.scale, size=v.shape).astype(np.float32) for k, v in delta.items()}
    if attack == "nan":
        return {k: np.full_like(v, NAN_MARK) for k, v in delta.items()}  # NaN is put into the payload after encoding
    if attack == "wrong_shape":
        return {k: np.zeros(v.size + 1, dtype=np.float32) for k, v in delta.items()}
    return delta


def handle_query(msg: Message, context: Context) -> Message:
    """Identify this site (the coordinator maps node ids to stable site names with it)."""
    site = resolve_site(context)
    return Message(content=RecordDict({"site": ConfigRecord({"name": site.name})}), reply_to=msg)


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
    model = _model_from(msg.content["config"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays, _ = unpack_global(msg.content, shapes)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    m = evaluate(model, site.x, site.y, site.num_classes)
    metrics = {"num-examples": int(len(site.y)), "eval-loss": m["loss"], "eval-accuracy": m["accuracy"]}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
