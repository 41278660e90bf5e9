"""YAML configuration validated into typed objects (scenario, coordinator, site).

A bad file yields one `ConfigError` line naming the file, the key and the allowed values;
the CLI prints it and exits 2. Models use `extra="forbid"` so a typo is an error, not a
silently ignored key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported as one line (file, key, what is allowed)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# ---------------------------------------------------------------- shared pieces


class ModelSpec(_Strict):
    """Architecture of the shared model; the coordinator sends it to sites each round."""

    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])


class StrategySpec(_Strict):
    """Aggregation rule, built on Flower's strategies."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_sites: int = Field(2, ge=1, description="sites needed before a round starts")
    proximal_mu: float = Field(0.0, ge=0.0)
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam eta")
    server_tau: float = Field(1e-3, gt=0.0, description="FedAdam tau")
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="FedTrimmedAvg: share cut at each end")
    num_malicious: int = Field(0, ge=0, description="Krum/MultiKrum: assumed Byzantine sites")
    num_to_select: int = Field(1, ge=1, description="MultiKrum: updates averaged")


class TrainSpec(_Strict):
    """Local training recipe the coordinator sends to sites each round."""

    local_epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(0.1, gt=0.0)
    batch_size: int = Field(32, ge=1)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    class_weighting: Literal["none", "balanced"] = "none"


class PrivacySpec(_Strict):
    """A site's record-level DP policy (Opacus DP-SGD), owned by the site.

    Noise: a fixed `noise_multiplier`, or `target_epsilon_per_round`, or neither, in which
    case the site calibrates the noise so the coordinator's announced rounds fit its budget.
    """

    enabled: bool = True
    epsilon_budget: float = Field(3.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon_per_round: float | None = Field(None, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["ghost", "hooks", "functorch", "ew"] = "ghost"

    @model_validator(mode="after")
    def _one_noise_rule(self) -> "PrivacySpec":
        if self.noise_multiplier is not None and self.target_epsilon_per_round is not None:
            raise ValueError("set at most one of noise_multiplier and target_epsilon_per_round")
        return self


class PartitionSpec(_Strict):
    """How a simulation splits a dataset across virtual sites."""

    scheme: Literal["iid", "dirichlet", "quantity", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0.0)
    min_partition_size: int = Field(2, ge=1)


class DataSpec(_Strict):
    """A built-in dataset (simulation and central test set)."""

    dataset: Literal["breast_cancer", "digits", "bank_fraud"] = "breast_cancer"
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")


class SimulationSpec(_Strict):
    """Flower simulation engine (Ray) resources."""

    cpus_per_site: int = Field(1, ge=1)
    ray_cpus: int | None = Field(None, ge=1, description="default: all cores")
    node_wait_s: float = Field(120.0, gt=0.0)


class ValidationSpec(_Strict):
    """Bounds the coordinator enforces on every site reply before aggregation."""

    max_update_norm: float | None = Field(None, gt=0.0, description="L2 norm bound on a site's model delta")
    max_payload_bytes: int | None = Field(None, gt=0, description="default: 2x the dense fp32 model")


Attack = Literal["sign_flip", "scale", "noise", "nan", "wrong_shape"]


class ByzantineSpec(_Strict):
    """Simulated misbehaving sites (chosen from the seed) and their attack."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    attack: Attack | list[Attack] = "sign_flip"  # a list is dealt round-robin over the Byzantine sites
    scale: float = Field(4.0, gt=0.0, description="factor for 'scale' and 'sign_flip', std for 'noise'")


class FaultSpec(_Strict):
    """Fault injection for simulations: drop-outs and Byzantine sites."""

    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0, description="chance a site fails a round")
    byzantine: ByzantineSpec = Field(default_factory=ByzantineSpec)


class MetricsSpec(_Strict):
    """Prometheus endpoint of the coordinator (off unless a port is given)."""

    prometheus_port: int | None = Field(None, ge=0, le=65535, description="0 = pick a free port")
    prometheus_host: str = "127.0.0.1"


class SparsitySpec(_Strict):
    """A global sparsity mask held by the coordinator (from the seed or the DP global model only)."""

    enabled: bool = False
    target: float = Field(0.8, ge=0.0, lt=1.0, description="final fraction of weights pruned")
    schedule: Literal["fixed", "progressive"] = "progressive"
    start_round: int = Field(1, ge=1)
    end_fraction: float = Field(0.75, gt=0.0, le=1.0, description="share of rounds by which target is reached")
    regrow_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="prune-and-regrow share per round after the ramp")


class CompressionSpec(_Strict):
    """Update encoding on the wire (after DP, so post-processing)."""

    codec: Literal["none", "fp16", "int8", "topk", "sparse_mask"] = "none"
    topk_fraction: float = Field(0.1, gt=0.0, le=1.0)
    quantize: Literal["none", "fp16", "int8"] = "none"
    error_feedback: bool = True
    index_coding: Literal["uint32", "delta", "bitmap"] = "delta"
    downlink: Literal["none", "fp16"] = "none"

    @model_validator(mode="after")
    def _valid_codec(self) -> "CompressionSpec":
        if self.quantize != "none" and self.codec not in ("topk", "sparse_mask"):
            raise ValueError(f"quantize applies to codec topk or sparse_mask only (codec is {self.codec!r})")
        self.codec_spec(0)  # raises ValueError with the allowed combinations
        return self

    def codec_spec(self, seed: int) -> "Any":
        """The fedseek.codec.CodecSpec for site uplinks."""
        from fedseek.codec import CodecSpec

        return CodecSpec(
            kind=self.codec,
            topk_fraction=self.topk_fraction,
            quantize=self.quantize if self.codec in ("topk", "sparse_mask") else "none",
            error_feedback=self.error_feedback and self.codec != "none",
            seed=seed,
            index_coding=self.index_coding,
        )


class WatermarkSpec(_Strict):
    """Coordinator-side ownership watermark (trigger set), embedded after every aggregation."""

    enabled: bool = False
    key_file: str | None = Field(None, description="secret key (fedseek watermark keygen); default OUT/watermark.key")
    triggers: int | None = Field(None, ge=10)
    target_trigger_accuracy: float = Field(0.98, gt=0.0, le=1.0)
    max_steps: int = Field(200, ge=1)
    alpha: float = Field(1e-6, gt=0.0, lt=1.0)


# ---------------------------------------------------------------- top-level files


class FederationSpec(_Strict):
    """What the coordinator runs: shared by scenarios and the deployed coordinator."""

    name: str = "fedseek"
    seed: int = 0
    rounds: int = Field(5, ge=1, le=100000)
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    round_timeout_s: float = Field(600.0, gt=0.0)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    sparsity: SparsitySpec = Field(default_factory=SparsitySpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    watermark: WatermarkSpec = Field(default_factory=WatermarkSpec)


class ScenarioConfig(FederationSpec):
    """A simulation: N virtual sites on a built-in dataset, run by Flower's simulation engine."""

    num_sites: int = Field(10, ge=1, le=100000)
    data: DataSpec = Field(default_factory=DataSpec)
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    privacy: PrivacySpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    faults: FaultSpec = Field(default_factory=FaultSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)

    @model_validator(mode="after")
    def _fit(self) -> "ScenarioConfig":
        if self.precision == "fp16" and self.privacy is not None and self.privacy.enabled:
            raise ValueError("precision fp16 is not supported with DP-SGD (GradScaler breaks per-sample clipping); use bf16")
        if self.strategy.min_sites > self.num_sites:
            raise ValueError(
                f"strategy.min_sites ({self.strategy.min_sites}) exceeds num_sites ({self.num_sites})"
            )
        return self


T = TypeVar("T", bound=BaseModel)


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    got_s = "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{path}: key '{key}': {msg}{got_s}{more}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning I/O and syntax problems into one-line ConfigErrors."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def parse(model: type[T], raw: dict[str, Any], source: str | Path = "<config>") -> T:
    """Validate a mapping into `model`, raising a one-line ConfigError on failure."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(source), err)) from None


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Load and validate a simulation scenario file."""
    return parse(ScenarioConfig, load_yaml(path), path)
