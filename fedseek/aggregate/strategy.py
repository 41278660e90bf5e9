"""Build the aggregation rule from config, on Flower's own strategies (flwr.serverapp.strategy)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedseek.config import StrategySpec


def build_strategy(spec: StrategySpec) -> FedAvg:
    """FedAvg / FedProx / FedAdam with our sampling: the coordinator samples and screens replies itself."""
    common = dict(fraction_train=spec.fraction_train, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    if spec.name == "fedavg":
        return FedAvg(**common)
    if spec.name == "fedprox":
        return FedProx(proximal_mu=spec.proximal_mu, **common)
    if spec.name == "fedadam":
        return FedAdam(eta=spec.server_lr, tau=spec.server_tau, **common)
    raise ValueError(f"unknown strategy {spec.name!r}; allowed: fedavg, fedprox, fedadam")


def prepare_round(strategy: FedAvg, arrays: ArrayRecord) -> None:
    """What Flower's configure_train would record: FedOpt needs the round's starting weights."""
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
