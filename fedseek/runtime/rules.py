"""Build the aggregation rule from config, on Flower's own strategies (flwr.serverapp.strategy)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

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
    if spec.name == "fedmedian":
        return FedMedian(**common)
    if spec.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=spec.trim_beta, **common)
    if spec.name == "krum":
        return Krum(num_malicious_nodes=spec.num_malicious, **common)
    if spec.name == "multikrum":
        return MultiKrum(num_malicious_nodes=spec.num_malicious, num_nodes_to_select=spec.num_to_select, **common)
    raise ValueError(f"unknown strategy {spec.name!r}; allowed: fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum, multikrum")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """Server optimizer state to checkpoint (FedAdam's moments); empty for stateless rules."""
    out: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t"):
        val = getattr(strategy, attr, None)
        if isinstance(val, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in val.items()})
    return out


def load_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Restore what strategy_state saved."""
    for attr in ("m_t", "v_t"):
        vals = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
        if vals:
            setattr(strategy, attr, vals)


def prepare_round(strategy: FedAvg, arrays: ArrayRecord) -> None:
    """What Flower's configure_train would record: FedOpt needs the round's starting weights."""
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
