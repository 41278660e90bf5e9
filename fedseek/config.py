"""YAML configuration validated into typed objects (scenario, coordinator, site).

A bad file yields one `ConfigError` line naming the file, the key and the allowed values;
the CLI prints it and exits 2. Models use `extra="forbid"` so a typo is an error, not a
silently ignored key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
    def _one_noise_rule(self) -> PrivacySpec:
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
    def _valid_codec(self) -> CompressionSpec:
        if self.quantize != "none" and self.codec not in ("topk", "sparse_mask"):
            raise ValueError(f"quantize applies to codec topk or sparse_mask only (codec is {self.codec!r})")
        self.codec_spec(0)  # raises ValueError with the allowed combinations
        return self

    def codec_spec(self, seed: int) -> Any:
        """The fedseek.wire.codec.CodecSpec for site uplinks."""
        from fedseek.wire.codec import CodecSpec

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
    max_steps: int = Field(600, ge=1, description="embedding steps per round at most (the first rounds need the most)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="embedding optimizer (adam: the v1 default, costlier in accuracy)")
    lr: float | None = Field(None, gt=0.0, description="embedding learning rate; default 0.05 for sgd, 5e-3 for adam")
    margin_steps: int = Field(0, ge=0, description="extra embedding steps once the target is reached (v1: 5)")
    distill_weight: float | None = Field(None, ge=0.0, description="weight of the distillation term; default fedseek.watermark.embed's (10; v1: 5)")
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
    def _fit(self) -> ScenarioConfig:
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


# ---------------------------------------------------------------- deployment (coordinator + sites)

_SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_ADDRESS = r"^(\[[0-9A-Fa-f:.]+\]|[^:\s/\[\]]+):\d{1,5}$"


def _site_name(value: str) -> str:
    """A site name usable as a file name and a Flower node name (what `fedseek certs add-site` accepts)."""
    import re

    if not re.match(_SITE_NAME, value):
        raise ValueError("use 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    return value


def _address(value: str) -> str:
    """host:port without a scheme (Flower's --superlink form)."""
    import re

    if not re.match(_ADDRESS, value) or not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ValueError("must be host:port without a scheme, e.g. coord.example.org:9092")
    return value
BuiltinName = Literal["breast_cancer", "digits", "bank_fraud"]


def _resolve_path(base: Path, value: str | None) -> str | None:
    """`value` made absolute against `base` (the YAML file's directory); `~` expanded; None stays None."""
    if value is None or value == "":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


class TaskSpec(_Strict):
    """The coordinator's view of the task: a built-in dataset, a held-out test table, or only shapes.

    `dataset`: the built-in split's test part is the central test set (sites use the same
    `seed` and `test_fraction` for their partitions, so train and test never overlap).
    `test_file` + `label_column`: a CSV/Parquet test table. `input_shape` + `num_classes`:
    no central evaluation at all.
    """

    dataset: BuiltinName | None = None
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")
    test_file: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    standardize: bool = True
    classes: list[str] | None = Field(None, description="fixes the label order every site must use")
    input_shape: list[int] | None = None
    num_classes: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        given = [k for k, v in (("dataset", self.dataset), ("test_file", self.test_file), ("input_shape", self.input_shape)) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of dataset, test_file (+ label_column) or input_shape (+ num_classes)"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.test_file and not self.label_column:
            raise ValueError("test_file needs label_column")
        if self.input_shape is not None:
            if self.num_classes is None:
                raise ValueError("input_shape needs num_classes")
            if not self.input_shape or any(d < 1 for d in self.input_shape):
                raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
        return self


class SuperLinkSpec(_Strict):
    """The coordinator's Flower SuperLink: address, TLS material, persistent state.

    `host` 127.0.0.1 keeps every API (Fleet for sites AND the unauthenticated Control API)
    on loopback; see docs/deployment.md before exposing it.
    """

    host: str = "127.0.0.1"
    port: int = Field(9092, ge=1, le=65535)
    state_dir: str = Field("state", description="pidfile, CLI home, default database and log")
    database: str | None = Field(None, description="sqlite file; default STATE_DIR/superlink.db")
    certs_dir: str = Field("certs", description="ca.crt, coordinator.crt, coordinator.key (fedseek certs init)")
    log_file: str | None = Field(None, description="default STATE_DIR/superlink.log")


class GatewaySpec(_Strict):
    """The Fleet-only TLS gateway (fedseek.ops.gateway): the sites' entry point, so the SuperLink and its
    unauthenticated Control API stay on loopback."""

    host: str = Field("0.0.0.0", description="public interface the sites reach")
    port: int = Field(9092, ge=1, le=65535)
    max_body_mb: int = Field(512, ge=1, description="largest request (a site's update) forwarded")


class AllowedSite(_Strict):
    """A site allowed to join: its name and OpenSSH public key (registered at coordinator start)."""

    name: str
    public_key: str

    _name = field_validator("name")(_site_name)


class CoordinatorConfig(FederationSpec):
    """A deployed coordinator: the federation plus the task, the SuperLink and the allowed sites."""

    task: TaskSpec
    superlink: SuperLinkSpec = Field(default_factory=SuperLinkSpec)
    gateway: GatewaySpec | None = Field(None, description="expose only the Fleet API (recommended beyond one host)")
    sites: list[AllowedSite] = Field(default_factory=list)
    expected_sites: int | None = Field(None, ge=1, description="sites awaited before round 1; default strategy.min_sites")
    node_wait_s: float = Field(300.0, gt=0.0)
    out_dir: str = "runs/deploy"
    privacy: PrivacySpec | None = Field(None, description="the sites' announced policy (summary only; each site enforces its own)")

    @model_validator(mode="after")
    def _fit(self) -> CoordinatorConfig:
        if self.expected_sites is None:
            self.expected_sites = self.strategy.min_sites
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        if self.sites and self.expected_sites > len(self.sites):
            raise ValueError(f"expected_sites ({self.expected_sites}) exceeds the {len(self.sites)} allowed sites")
        if self.gateway is not None:
            if self.superlink.host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"with a gateway, superlink.host must be loopback (127.0.0.1), not {self.superlink.host!r}: "
                                 "the gateway is the only public entry")
            if self.gateway.port == self.superlink.port:
                raise ValueError(f"gateway.port and superlink.port are both {self.gateway.port}: give the SuperLink another port")
        if self.sites and self.strategy.min_sites > len(self.sites):
            raise ValueError(f"strategy.min_sites ({self.strategy.min_sites}) exceeds the {len(self.sites)} allowed sites")
        return self

    def resolve_paths(self, base: Path) -> CoordinatorConfig:
        """Make every path absolute against `base` and fill the state-dir defaults."""
        sl = self.superlink
        sl.state_dir = str(_resolve_path(base, sl.state_dir))
        sl.certs_dir = str(_resolve_path(base, sl.certs_dir))
        sl.database = _resolve_path(base, sl.database) or str(Path(sl.state_dir) / "superlink.db")
        sl.log_file = _resolve_path(base, sl.log_file) or str(Path(sl.state_dir) / "superlink.log")
        self.out_dir = str(_resolve_path(base, self.out_dir))
        self.task.test_file = _resolve_path(base, self.task.test_file)
        for s in self.sites:
            s.public_key = str(_resolve_path(base, s.public_key))
        if self.watermark.key_file:
            self.watermark.key_file = _resolve_path(base, self.watermark.key_file)
        return self


class SiteDataSpec(_Strict):
    """A site's training data: its own table or image folder (`path`), or a built-in partition (demos).

    Table: `path` (.csv/.parquet) + `label_column` (+ `feature_columns`, `standardize`).
    Images: `path` (root/CLASS/*.png) + `image_size`. Built-in: `builtin` + `partition` of
    `num_partitions`, split like a simulation (`scheme`, `alpha`, `seed` = the coordinator's seed).
    """

    path: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    standardize: bool = True
    classes: list[str] | None = Field(None, description="label order shared by the federation")
    image_size: int | None = Field(None, ge=1)
    grayscale: bool = True
    builtin: BuiltinName | None = None
    partition: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)
    scheme: Literal["iid", "dirichlet", "quantity", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0.0)
    seed: int = 0
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    min_partition_size: int = Field(2, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")

    @model_validator(mode="after")
    def _one_source(self) -> SiteDataSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path (a table or image folder) and builtin (a demo partition)")
        if self.path is not None and self.image_size is None and not self.label_column:
            raise ValueError("a table needs label_column (or give image_size for an image folder)")
        if self.builtin is not None:
            if self.partition is None or self.num_partitions is None:
                raise ValueError("builtin needs partition and num_partitions")
            if self.partition >= self.num_partitions:
                raise ValueError(f"partition {self.partition} is not below num_partitions {self.num_partitions}")
        return self


class SiteConfig(_Strict):
    """A site daemon (hospital, bank): identity, how to reach and trust the coordinator, its data and DP policy."""

    name: str
    coordinator: str = Field(description="host:port of the coordinator, no scheme")
    root_certificates: str = Field(description="the federation's CA certificate (verifies the coordinator)")
    auth_private_key: str = Field(description="the site's OpenSSH ECDSA private key (fedseek certs add-site)")
    data: SiteDataSpec
    privacy: PrivacySpec | None = None
    state_dir: str | None = Field(None, description="privacy ledger, Flower home, pidfile, log; default state/NAME")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    runtime_port: int = Field(9094, ge=1, le=65535, description="SuperNode's local API port: unique per site on one host")
    max_retries: int | None = Field(None, ge=0, description="reconnect attempts after a lost connection; default unlimited")
    max_wait_s: float | None = Field(None, gt=0.0, description="give up reconnecting after this long; default never")

    _name = field_validator("name")(_site_name)
    _coordinator = field_validator("coordinator")(_address)

    def resolve_paths(self, base: Path) -> SiteConfig:
        """Make every path absolute against `base` and fill the state-dir default."""
        self.root_certificates = str(_resolve_path(base, self.root_certificates))
        self.auth_private_key = str(_resolve_path(base, self.auth_private_key))
        self.data.path = _resolve_path(base, self.data.path)
        self.state_dir = _resolve_path(base, self.state_dir) or str((base / "state" / self.name).resolve())
        return self


def load_coordinator(path: str | Path) -> CoordinatorConfig:
    """Load and validate a coordinator file; relative paths resolve against its directory."""
    p = Path(path).resolve()
    return parse(CoordinatorConfig, load_yaml(p), path).resolve_paths(p.parent)


def load_site(path: str | Path) -> SiteConfig:
    """Load and validate a site file (a `site:` mapping, as `fedseek certs add-site` writes, is merged in)."""
    p = Path(path).resolve()
    raw = load_yaml(p)
    nested = raw.pop("site", None)
    if isinstance(nested, dict):
        raw = {**nested, **raw}
    elif nested is not None:
        raw["site"] = nested  # reported as an unknown key
    return parse(SiteConfig, raw, path).resolve_paths(p.parent)
