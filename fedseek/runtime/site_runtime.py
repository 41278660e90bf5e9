"""Who a site is and what it holds: resolved once per process from Flower's node config.

Deployment: the node config's `site-config` names the site YAML (data path, privacy policy,
state dir). Simulation: the site is partition `partition-id` of the scenario's built-in
dataset, with its state under OUT/sites/site-NNN.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context

from fedseek.config import PrivacySpec, ScenarioConfig, SiteConfig, load_scenario, load_site
from fedseek.data.holdout import holdout_key, holdout_mask
from fedseek.data.site_data import load_site_data
from fedseek.wire.data_schema import DataSchema, schema_mismatch

log = logging.getLogger("fedseek.runtime.site_runtime")


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
    index: int = 0
    x_eval: np.ndarray | None = None  # held-out records: evaluated on, never trained on
    y_eval: np.ndarray | None = None
    holdout_fraction: float = 0.0
    schema: DataSchema | None = None  # the site's own data schema, checked against the coordinator's every round
    scaling: str = "builtin"  # the site's own preprocessing.scaling (federated: x holds raw values until a round brings statistics)


def schema_refusal(site: SiteRuntime, announced: DataSchema | None) -> str | None:
    """Why this site's data does not fit the schema the coordinator announced (None: it fits, or none was announced)."""
    if announced is None or site.schema is None:
        return None
    problem = schema_mismatch(announced, site.schema)
    if not problem:
        return None
    log.warning("data schema differs from the coordinator's: %s (this site: classes %s, %d of them; shape %s)",
                problem, site.schema.classes, site.schema.num_classes, site.schema.input_shape)  # the site's own log only
    return f"data schema differs from the coordinator's: {problem}"


def scaling_refusal(site: SiteRuntime, scaling: Any) -> str | None:
    """Why this site cannot use the round's scaling (None: it can): federated statistics missing, or a column without them."""
    if site.scaling != "federated":
        return None
    if scaling is None or not scaling.mean:
        return "this site's preprocessing.scaling is federated but the round brings no fitted statistics"
    return None


def scaled_rows(site: SiteRuntime, x: np.ndarray, y: np.ndarray, scaling: Any) -> tuple[np.ndarray, np.ndarray]:
    """The rows as the model sees them: with scaling: federated, features (and a regression target) scaled by the
    statistics the round brings (a FittedScaling); otherwise as loaded. ValueError when federated statistics are missing."""
    if site.scaling != "federated":
        return x, y
    if scaling is None or not scaling.mean:
        raise ValueError("this site's scaling is federated but the round brings no fitted statistics (scaling)")
    from fedseek.data.preprocess import apply_scaling

    names = list(site.schema.features or []) if site.schema is not None else []
    x = apply_scaling(x.reshape(len(x), -1), names, scaling.mean, scaling.std).reshape(x.shape)
    target = next((k for k in scaling.mean if k not in names), None)  # the label column's statistics (regression)
    if site.schema is not None and site.schema.task == "regression" and target is not None:
        y = ((np.asarray(y, dtype=np.float64) - scaling.mean[target]) / scaling.std[target]).astype(np.float32)
    return x, y


def split_holdout(site: SiteRuntime, fraction: float, *, seed: int | None) -> SiteRuntime:
    """Move the site's held-out records (a fixed keyed-hash function of each record) out of its training data."""
    if fraction <= 0.0:
        return site
    held = holdout_mask(site.x, site.y, fraction, holdout_key(site.state_dir, seed=seed))
    site.x_eval, site.y_eval = site.x[held], site.y[held]
    site.x, site.y = site.x[~held], site.y[~held]
    site.holdout_fraction = float(fraction)
    return site


def _own_scaling(spec: Any, standardize: bool) -> str:
    """A table site's scaling: its preprocessing's, else local or none (`standardize`)."""
    return str(spec.scaling) if spec is not None else ("local" if standardize else "none")


@functools.lru_cache(maxsize=4)
def _scenario(path: str, mtime: float) -> ScenarioConfig:
    return load_scenario(path)


@functools.lru_cache(maxsize=8)
def _partitions(path: str, mtime: float) -> tuple[Any, list[np.ndarray]]:
    from fedseek.data.scenario_data import scenario_data

    data = scenario_data(_scenario(path, mtime))
    return data.train, data.parts


@functools.lru_cache(maxsize=4)
def _site_config(path: str, mtime: float) -> SiteConfig:
    return load_site(path)


@functools.lru_cache(maxsize=4)
def _deployed_site(path: str, mtime: float, data_mtime: float) -> SiteRuntime:
    """A site daemon's runtime from its YAML (cached per process on the config's and the data's mtime)."""
    cfg = _site_config(path, mtime)
    ds = load_site_data(cfg)
    site = SiteRuntime(
        name=cfg.name,
        x=ds.x,
        y=ds.y,
        num_classes=int(ds.num_classes),
        privacy=cfg.privacy if (cfg.privacy and cfg.privacy.enabled) else None,
        state_dir=Path(str(cfg.state_dir)),
        device=cfg.device,
        precision=cfg.precision,
        index=int(cfg.data.partition or 0),
        schema=ds.schema(),
        scaling=_own_scaling(cfg.data.preprocessing, cfg.data.standardize) if cfg.data.path and cfg.data.image_size is None else "builtin",
    )
    return split_holdout(site, cfg.holdout_fraction, seed=None)


def scenario_config(context: Context) -> ScenarioConfig:
    """The scenario a simulated site belongs to (cached per process on the file's mtime)."""
    path = str(context.run_config.get("config-path", ""))
    if not path:
        raise ValueError("run config 'config-path' is empty")
    return _scenario(path, os.path.getmtime(path))


def resolve_site(context: Context) -> SiteRuntime:
    """Deployment: the node config's `site-config` names the site YAML. Simulation: a partition of the scenario dataset."""
    rc, nc = context.run_config, context.node_config
    if nc.get("site-config"):
        site_path = str(nc["site-config"])
        site_cfg = _site_config(site_path, os.path.getmtime(site_path))
        data_mtime = os.path.getmtime(site_cfg.data.path) if site_cfg.data.path else 0.0
        return _deployed_site(site_path, os.path.getmtime(site_path), data_mtime)
    cfg = scenario_config(context)
    path = str(rc["config-path"])
    mtime = os.path.getmtime(path)
    pid = int(nc.get("partition-id", 0))
    train, parts = _partitions(path, mtime)
    idx = parts[pid]
    name = f"site-{pid:03d}"
    state_root = Path(str(rc.get("state-dir", "") or Path(str(rc.get("out-dir", "runs/latest"))) / "sites"))
    site = SiteRuntime(
        name=name,
        x=train.x[idx],
        y=train.y[idx],
        num_classes=int(train.num_classes),
        privacy=cfg.privacy if (cfg.privacy and cfg.privacy.enabled) else None,
        state_dir=state_root / name,
        device=cfg.device,
        precision=cfg.precision,
        num_sites=cfg.num_sites,
        index=pid,
        schema=train.schema(),
        scaling=cfg.data.preprocess.scaling if cfg.data.own_tables else "builtin",
    )
    if cfg.evaluation.every <= 0:
        return site
    # A DP site draws its holdout key from its CSPRNG (kept in its state dir); a non-DP simulation stays seed-reproducible.
    return split_holdout(site, cfg.evaluation.holdout_fraction, seed=None if site.privacy is not None else cfg.seed * 1000003 + pid)
