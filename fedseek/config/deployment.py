"""A deployment: the coordinator service (task, SuperLink, gateway, allowed sites) and each site daemon (data, privacy policy, device)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedseek.config.federation import FederationSpec, PrivacySpec, check_task_fit
from fedseek.config.loading import StrictSpec, check_address, check_site_name, load_yaml, parse, resolve_path
from fedseek.config.preprocess import PreprocessSpec
from fedseek.names import DatasetName, Device, PartitionScheme, SitePrecision, TaskType


class TaskSpec(StrictSpec):
    """The coordinator's view of the task: a built-in dataset, a held-out test table, or only shapes.

    `dataset`: the built-in split's test part is the central test set (sites use the same
    `seed` and `test_fraction` for their partitions, so train and test never overlap).
    `test_file` + `label_column`: a CSV/Parquet test table. `input_shape` + `num_classes`:
    no central evaluation at all.
    """

    dataset: DatasetName | None = None
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")
    test_file: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    standardize: bool = True
    preprocessing: PreprocessSpec | None = Field(None, description="the test table's preprocessing (replaces standardize)")
    classes: list[str] | None = Field(None, description="fixes the label order every site must use")
    input_shape: list[int] | None = None
    num_classes: int | None = Field(None, ge=2)
    task: TaskType = Field("classification", description="classification (labels are classes) or regression (a number)")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if self.task == "regression" and (self.classes is not None or self.num_classes is not None or self.dataset):
            raise ValueError("task: regression predicts a number: leave out classes, num_classes and dataset "
                             "(give test_file or input_shape)")
        given = [k for k, v in (("dataset", self.dataset), ("test_file", self.test_file), ("input_shape", self.input_shape)) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of dataset, test_file (+ label_column) or input_shape (+ num_classes)"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.test_file and not self.label_column:
            raise ValueError("test_file needs label_column")
        if self.preprocessing is not None and self.preprocessing.scaling == "federated" and not self.test_file:
            if not self.feature_columns:
                raise ValueError("preprocessing.scaling: federated without a test_file needs feature_columns (the columns the sites "
                                 "compute statistics for)")
            if self.task == "regression" and not self.label_column:
                raise ValueError("preprocessing.scaling: federated for a regression needs label_column (the target's statistics)")
        if self.input_shape is not None:
            if self.num_classes is None and self.task == "classification":
                raise ValueError("input_shape needs num_classes")
            if not self.input_shape or any(d < 1 for d in self.input_shape):
                raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
        return self


class SuperLinkSpec(StrictSpec):
    """The coordinator's Flower SuperLink: address, TLS material, persistent state.

    `host` 127.0.0.1 keeps every API (Fleet for sites AND the unauthenticated Control API)
    on loopback; see docs/deployment.md before exposing it.
    """

    host: str = "127.0.0.1"
    port: int = Field(9192, ge=1, le=65535, description="loopback port (the endpoint or gateway forwards to it)")
    state_dir: str = Field("state", description="pidfile, CLI home, default database and log")
    database: str | None = Field(None, description="sqlite file; default STATE_DIR/superlink.db")
    certs_dir: str = Field("certs", description="ca.crt, coordinator.crt, coordinator.key (fedseek certs init)")
    log_file: str | None = Field(None, description="default STATE_DIR/superlink.log")


class GatewaySpec(StrictSpec):
    """The Fleet-only TLS gateway (fedseek.ops.gateway): the sites' entry point, so the SuperLink and its
    unauthenticated Control API stay on loopback."""

    host: str = Field("0.0.0.0", description="public interface the sites reach")
    port: int = Field(9092, ge=1, le=65535)
    max_body_mb: int = Field(512, ge=1, description="largest request (a site's update) forwarded")


class EndpointSpec(StrictSpec):
    """The coordinator endpoint (fedseek.ops.transport.endpoint): gRPC with mutual TLS, the only public listener."""

    host: str = Field("0.0.0.0", description="public interface the sites reach")
    port: int = Field(9092, ge=1, le=65535)
    max_message_mb: int | None = Field(None, ge=1, le=2048, description="largest message; default from the model size")
    max_concurrent_calls: int = Field(64, ge=1, le=10_000)
    max_connections: int = Field(256, ge=1, le=100_000)
    call_timeout_s: float = Field(120.0, gt=0.0)


Transport = Literal["grpc", "https-gateway", "https"]


class AllowedSite(StrictSpec):
    """A site allowed to join: its name and OpenSSH public key (registered at coordinator start)."""

    name: str
    public_key: str

    _name = field_validator("name")(check_site_name)


class CoordinatorConfig(FederationSpec):
    """A deployed coordinator: the federation plus the task, the SuperLink and the allowed sites."""

    task: TaskSpec
    superlink: SuperLinkSpec = Field(default_factory=SuperLinkSpec)
    transport: Transport | None = Field(None, description="grpc (default: mutual TLS endpoint), https-gateway "
                                        "(the older HTTPS Fleet gateway) or https (sites reach the SuperLink directly)")
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    gateway: GatewaySpec | None = Field(None, description="the older HTTPS Fleet-only gateway (transport https-gateway, "
                                        "or beside the endpoint for sites that cannot run the proxy)")
    sites: list[AllowedSite] = Field(default_factory=list)
    expected_sites: int | None = Field(None, ge=1, description="sites awaited before round 1; default strategy.min_sites")
    node_wait_s: float = Field(300.0, gt=0.0)
    out_dir: str = "runs/deploy"
    privacy: PrivacySpec | None = Field(None, description="the sites' announced policy (summary only; each site enforces its own)")

    @model_validator(mode="after")
    def _fit(self) -> CoordinatorConfig:
        check_task_fit(self, self.task.task)
        if self.expected_sites is None:
            self.expected_sites = self.strategy.min_sites
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        if self.sites and self.expected_sites > len(self.sites):
            raise ValueError(f"expected_sites ({self.expected_sites}) exceeds the {len(self.sites)} allowed sites")
        if self.transport is None:
            self.transport = "https-gateway" if self.gateway is not None else "grpc"
        if self.transport == "https-gateway" and self.gateway is None:
            self.gateway = GatewaySpec()
        if self.transport == "grpc":
            if self.superlink.host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"with transport grpc, superlink.host must be loopback (127.0.0.1), not {self.superlink.host!r}: "
                                 "the endpoint is the only public entry")
            if self.endpoint.port == self.superlink.port:
                raise ValueError(f"endpoint.port and superlink.port are both {self.endpoint.port}: give the SuperLink another "
                                 "port (default 9192)")
            if not self.sites:
                raise ValueError("transport grpc needs the sites list (their certificates and node keys are checked per call)")
        if self.gateway is not None:
            if self.superlink.host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"with a gateway, superlink.host must be loopback (127.0.0.1), not {self.superlink.host!r}: "
                                 "the gateway is the only public entry")
            if self.transport == "grpc" and self.gateway.port == self.endpoint.port:
                raise ValueError(f"gateway.port and endpoint.port are both {self.gateway.port}")
            if self.gateway.port == self.superlink.port:
                raise ValueError(f"gateway.port and superlink.port are both {self.gateway.port}: give the SuperLink another port")
        if self.sites and self.strategy.min_sites > len(self.sites):
            raise ValueError(f"strategy.min_sites ({self.strategy.min_sites}) exceeds the {len(self.sites)} allowed sites")
        return self

    def resolve_paths(self, base: Path) -> CoordinatorConfig:
        """Make every path absolute against `base` and fill the state-dir defaults."""
        sl = self.superlink
        sl.state_dir = str(resolve_path(base, sl.state_dir))
        sl.certs_dir = str(resolve_path(base, sl.certs_dir))
        sl.database = resolve_path(base, sl.database) or str(Path(sl.state_dir) / "superlink.db")
        sl.log_file = resolve_path(base, sl.log_file) or str(Path(sl.state_dir) / "superlink.log")
        self.out_dir = str(resolve_path(base, self.out_dir))
        self.task.test_file = resolve_path(base, self.task.test_file)
        for s in self.sites:
            s.public_key = str(resolve_path(base, s.public_key))
        if self.watermark.key_file:
            self.watermark.key_file = resolve_path(base, self.watermark.key_file)
        if self.distill is not None:
            self.distill.teacher = str(resolve_path(base, self.distill.teacher))
        return self


class SiteDataSpec(StrictSpec):
    """A site's training data: its own table or image folder (`path`), or a built-in partition (demos).

    Table: `path` (.csv/.parquet) + `label_column` (+ `feature_columns`, `standardize`).
    Images: `path` (root/CLASS/*.png) + `image_size`. Built-in: `builtin` + `partition` of
    `num_partitions`, split like a simulation (`scheme`, `alpha`, `seed` = the coordinator's seed).
    """

    path: str | None = None
    label_column: str | None = None
    feature_columns: list[str] | None = None
    standardize: bool = True
    preprocessing: PreprocessSpec | None = Field(None, description="categorical vocabularies, fill values, scaling "
                                                 "(replaces standardize; the same at every site)")
    classes: list[str] | None = Field(None, description="label order shared by the federation")
    task: TaskType = Field("classification", description="classification (labels are classes) or regression (a number)")
    image_size: int | None = Field(None, ge=1)
    grayscale: bool = True
    builtin: DatasetName | None = None
    partition: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)
    scheme: PartitionScheme = "iid"
    alpha: float = Field(0.5, gt=0.0)
    seed: int = 0
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    min_partition_size: int = Field(2, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")

    @model_validator(mode="after")
    def _one_source(self) -> SiteDataSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path (a table or image folder) and builtin (a demo partition)")
        if self.task == "regression" and (self.classes is not None or self.image_size is not None or self.builtin is not None):
            raise ValueError("task: regression reads a number from a table's label_column: leave out classes, image_size and builtin")
        if self.path is not None and self.image_size is None and not self.label_column:
            raise ValueError("a table needs label_column (or give image_size for an image folder)")
        if self.builtin is not None:
            if self.partition is None or self.num_partitions is None:
                raise ValueError("builtin needs partition and num_partitions")
            if self.partition >= self.num_partitions:
                raise ValueError(f"partition {self.partition} is not below num_partitions {self.num_partitions}")
        return self


class SiteConfig(StrictSpec):
    """A site daemon (hospital, bank): identity, how to reach and trust the coordinator, its data and DP policy."""

    name: str
    coordinator: str = Field(description="host:port of the coordinator, no scheme")
    root_certificates: str = Field(description="the federation's CA certificate (verifies the coordinator)")
    auth_private_key: str = Field(description="the site's OpenSSH ECDSA private key (fedseek certs request)")
    transport: Literal["grpc", "https"] = Field("grpc", description="grpc: through the local site proxy with mutual TLS; "
                                                "https: the SuperNode reaches the coordinator directly")
    tls_certificate: str | None = Field(None, description="this site's certificate, NAME.crt (fedseek certs sign)")
    tls_private_key: str | None = Field(None, description="this site's TLS key, NAME.tls.key (fedseek certs request)")
    proxy_port: int = Field(9095, ge=1, le=65535, description="the site proxy's loopback port: unique per site on one host")
    max_message_mb: int = Field(64, ge=1, le=2048, description="largest message the site proxy carries")
    poll_interval_s: float = Field(0.5, ge=0.05, le=30.0, description="how often an idle SuperNode asks for work "
                                   "(Flower's own: 3 s)")
    warm_clientapp: bool = Field(True, description="start each ClientApp process by forking a pre-imported worker "
                                 "instead of a fresh interpreter (still one process per message)")
    data: SiteDataSpec
    privacy: PrivacySpec | None = None
    holdout_fraction: float = Field(
        0.2, ge=0.0, lt=0.9, description="records held out of training for federated evaluation (0 = evaluation refused)"
    )
    state_dir: str | None = Field(None, description="privacy ledger, Flower home, pidfile, log; default state/NAME")
    device: Device = "auto"
    precision: SitePrecision = "fp32"
    runtime_port: int = Field(9094, ge=1, le=65535, description="SuperNode's local API port: unique per site on one host")
    max_retries: int | None = Field(None, ge=0, description="reconnect attempts after a lost connection; default unlimited")
    max_wait_s: float | None = Field(None, gt=0.0, description="give up reconnecting after this long; default never")

    _name = field_validator("name")(check_site_name)
    _coordinator = field_validator("coordinator")(check_address)

    @model_validator(mode="after")
    def _grpc_needs_certificate(self) -> SiteConfig:
        if self.transport == "grpc" and (not self.tls_certificate or not self.tls_private_key):
            raise ValueError("transport grpc needs tls_certificate (NAME.crt from the coordinator) and tls_private_key "
                             "(NAME.tls.key from `fedseek certs request`)")
        if self.proxy_port == self.runtime_port:
            raise ValueError(f"proxy_port and runtime_port are both {self.proxy_port}")
        return self

    def resolve_paths(self, base: Path) -> SiteConfig:
        """Make every path absolute against `base` and fill the state-dir default."""
        self.root_certificates = str(resolve_path(base, self.root_certificates))
        self.auth_private_key = str(resolve_path(base, self.auth_private_key))
        self.tls_certificate = resolve_path(base, self.tls_certificate)
        self.tls_private_key = resolve_path(base, self.tls_private_key)
        self.data.path = resolve_path(base, self.data.path)
        self.state_dir = resolve_path(base, self.state_dir) or str((base / "state" / self.name).resolve())
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
