"""YAML configuration validated into typed objects (scenario, coordinator, site).

A bad file yields one `ConfigError` line naming the file, the key and the allowed values;
the CLI prints it and exits 2. Models use `extra="forbid"` so a typo is an error, not a
silently ignored key.
"""

from fedseek.config.deployment import (
    AllowedSite,
    CoordinatorConfig,
    GatewaySpec,
    SiteConfig,
    SiteDataSpec,
    SuperLinkSpec,
    TaskSpec,
    load_coordinator,
    load_site,
)
from fedseek.config.federation import (
    CompressionSpec,
    DistributedPrivacySpec,
    EvaluationPrivacySpec,
    FederatedEvaluationSpec,
    FederationSpec,
    MetricsSpec,
    ModelSpec,
    PrivacySpec,
    SecureAggregationSpec,
    SparsitySpec,
    StrategySpec,
    TrainSpec,
    ValidationSpec,
    WatermarkSpec,
)
from fedseek.config.loading import ConfigError, load_yaml, parse
from fedseek.config.scenario import ByzantineSpec, DataSpec, FaultSpec, PartitionSpec, ScenarioConfig, SimulationSpec, load_scenario

__all__ = [
    "AllowedSite",
    "ByzantineSpec",
    "CompressionSpec",
    "DistributedPrivacySpec",
    "ConfigError",
    "CoordinatorConfig",
    "DataSpec",
    "EvaluationPrivacySpec",
    "FaultSpec",
    "FederatedEvaluationSpec",
    "FederationSpec",
    "GatewaySpec",
    "MetricsSpec",
    "ModelSpec",
    "PartitionSpec",
    "PrivacySpec",
    "SecureAggregationSpec",
    "ScenarioConfig",
    "SimulationSpec",
    "SiteConfig",
    "SiteDataSpec",
    "SparsitySpec",
    "StrategySpec",
    "SuperLinkSpec",
    "TaskSpec",
    "TrainSpec",
    "ValidationSpec",
    "WatermarkSpec",
    "load_coordinator",
    "load_scenario",
    "load_site",
    "load_yaml",
    "parse",
]
