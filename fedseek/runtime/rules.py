"""The aggregation rule from config, on Flower's own strategies (flwr.serverapp.strategy)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from fedseek.config import StrategySpec
from fedseek.names import STRATEGIES


def build_rule(spec: StrategySpec) -> FedAvg:
    """The inner Flower strategy; fedseek's SiteStrategy wraps it and does the sampling (so the rule takes every site it is shown)."""
    common: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_available_nodes": 1, "min_train_nodes": 1}
    rules = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(proximal_mu=spec.proximal_mu, **common),
        "fedavgm": lambda: FedAvgM(server_learning_rate=spec.server_lr or 1.0, server_momentum=spec.server_momentum, **common),
        "fedadam": lambda: FedAdam(eta=spec.server_lr or 0.01, tau=spec.server_tau, **common),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(beta=spec.trim_beta, **common),
        "krum": lambda: Krum(num_malicious_nodes=spec.num_malicious, **common),
        "multikrum": lambda: MultiKrum(num_malicious_nodes=spec.num_malicious, num_nodes_to_select=spec.num_to_select, **common),
    }
    assert set(rules) == set(STRATEGIES), "every strategy name in fedseek.names has a rule"
    return rules[spec.name]()
