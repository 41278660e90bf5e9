"""A simulation scenario: N virtual sites on a built-in dataset, partitioned non-IID, with simulated faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from fedseek.config.federation import FederationSpec, PrivacySpec
from fedseek.config.loading import StrictSpec, load_yaml, parse
from fedseek.names import Attack, DatasetName, Device, PartitionScheme, Precision


class PartitionSpec(StrictSpec):
    """How a simulation splits a dataset across virtual sites."""

    scheme: PartitionScheme = "iid"
    alpha: float = Field(0.5, gt=0.0)
    min_partition_size: int = Field(2, ge=1)


class DataSpec(StrictSpec):
    """A built-in dataset (simulation and central test set)."""

    dataset: DatasetName = "breast_cancer"
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")


class SimulationSpec(StrictSpec):
    """Flower simulation engine (Ray) resources."""

    cpus_per_site: int = Field(1, ge=1)
    ray_cpus: int | None = Field(None, ge=1, description="default: all cores")
    node_wait_s: float = Field(120.0, gt=0.0)


class ByzantineSpec(StrictSpec):
    """Simulated misbehaving sites (chosen from the seed) and their attack."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    attack: Attack | list[Attack] = "sign_flip"  # a list is dealt round-robin over the Byzantine sites
    scale: float = Field(4.0, gt=0.0, description="factor for 'scale' and 'sign_flip', std for 'noise'")


class FaultSpec(StrictSpec):
    """Fault injection for simulations: drop-outs and Byzantine sites."""

    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0, description="chance a site fails a round")
    byzantine: ByzantineSpec = Field(default_factory=ByzantineSpec)


class ScenarioConfig(FederationSpec):
    """A simulation: N virtual sites on a built-in dataset, run by Flower's simulation engine."""

    num_sites: int = Field(10, ge=1, le=100000)
    data: DataSpec = Field(default_factory=DataSpec)
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    privacy: PrivacySpec | None = None
    device: Device = "cpu"
    precision: Precision = "fp32"
    faults: FaultSpec = Field(default_factory=FaultSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)

    @model_validator(mode="after")
    def _fit(self) -> ScenarioConfig:
        if self.precision == "fp16" and self.privacy is not None and self.privacy.enabled:
            raise ValueError("precision fp16 is not supported with DP-SGD (GradScaler breaks per-sample clipping); use bf16")
        if self.privacy is not None and self.privacy.enabled and self.train.class_weighting == "balanced":
            raise ValueError(
                "train.class_weighting 'balanced' is computed from each site's private label counts and is refused under DP; "
                "use 'none' or privacy.class_weights"
            )
        if self.strategy.min_sites > self.num_sites:
            raise ValueError(
                f"strategy.min_sites ({self.strategy.min_sites}) exceeds num_sites ({self.num_sites})"
            )
        return self


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Load and validate a simulation scenario file."""
    return parse(ScenarioConfig, load_yaml(path), path)
