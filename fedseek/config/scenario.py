"""A simulation scenario: N virtual sites on a built-in dataset or your own tables, non-IID, with simulated faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from fedseek.config.federation import FederationSpec, PrivacySpec, SecureAggregationSpec, check_task_fit
from fedseek.config.loading import ConfigError, StrictSpec, load_yaml, parse, resolve_path
from fedseek.config.preprocess import PreprocessSpec
from fedseek.names import Attack, DatasetName, Device, PartitionScheme, Precision, TaskType

#: Rows of the built-in datasets (sklearn's bundled tables), to check num_sites without loading them (scikit-learn costs ~1 s).
BUILTIN_ROWS = {"breast_cancer": 569, "digits": 1797}


def builtin_train_rows(dataset: str, test_fraction: float, options: dict[str, Any]) -> int | None:
    """About how many training rows a built-in dataset gives (None when it cannot be told without generating it)."""
    if dataset == "bank_fraud":
        try:
            total = int(options.get("num_banks", 10)) * int(options.get("rows_per_bank", 2000))
        except (TypeError, ValueError):
            return None
    elif dataset in BUILTIN_ROWS:
        total = BUILTIN_ROWS[dataset]
    else:
        return None
    return int(total * (1.0 - test_fraction))


class PartitionSpec(StrictSpec):
    """How a simulation splits a dataset across virtual sites."""

    scheme: PartitionScheme = "iid"
    alpha: float = Field(0.5, gt=0.0)
    min_partition_size: int = Field(2, ge=1)


class DataSpec(StrictSpec):
    """The simulation's data: a built-in dataset, or your own tables (CSV/Parquet).

    Own tables, one of: `tables` (one file per site, in site order), `table` + `site_column`
    (one file, each value of the column is a site: a natural split), or `table` alone (split
    across `num_sites` by the scenario's `partition`). `test_table` is the coordinator's central
    test set; without it a lone `table` keeps `test_fraction` of its rows (stratified) as the
    test set, and per-site tables have none (federated evaluation still works). Paths are relative
    to the scenario file. Each site scales its features by its own statistics (`standardize`),
    as a deployed site daemon does with the same loader.
    """

    dataset: DatasetName = "breast_cancer"
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra builtin args")
    tables: list[str] | None = Field(None, min_length=1, description="one CSV/Parquet file per site")
    table: str | None = Field(None, description="one CSV/Parquet file for every site")
    site_column: str | None = Field(None, description="column of `table` naming each row's site (natural split)")
    test_table: str | None = Field(None, description="the coordinator's central test table")
    label_column: str = "label"
    feature_columns: list[str] | None = Field(None, description="default: every column but the label (and site_column)")
    classes: list[str] | None = Field(None, description="label values in class order; default: every value seen, sorted")
    task: TaskType = Field("classification", description="classification (labels are classes) or regression (a number per row)")
    standardize: bool = True
    preprocessing: PreprocessSpec | None = Field(None, description="categorical vocabularies, fill values, scaling "
                                                 "(replaces standardize)")

    @property
    def preprocess(self) -> PreprocessSpec:
        """The preprocessing every site applies: the declared one, else local or no scaling (`standardize`)."""
        if self.preprocessing is not None:
            return self.preprocessing
        return PreprocessSpec(scaling="local" if self.standardize else "none")

    @property
    def own_tables(self) -> bool:
        """True when the scenario trains on the user's tables instead of a built-in dataset."""
        return self.tables is not None or self.table is not None

    @property
    def source_name(self) -> str:
        """What the scenario trains on, for headers and reports: the built-in name or the table's file name."""
        if self.tables is not None:
            return f"{len(self.tables)} tables"
        return Path(self.table).name if self.table else self.dataset

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.tables is not None and self.table is not None:
            raise ValueError("give either tables (one file per site) or table (one file), not both")
        if self.own_tables and ("dataset" in self.model_fields_set or self.options):
            raise ValueError("dataset/options name a built-in dataset: leave them out when the scenario names its own tables")
        if self.site_column is not None and self.table is None:
            raise ValueError("site_column splits `table` by site: it needs table")
        if not self.own_tables and (self.test_table or self.site_column or self.classes or self.feature_columns
                                    or "label_column" in self.model_fields_set):
            raise ValueError("test_table, site_column, label_column, feature_columns and classes apply to own tables "
                             "(tables or table)")
        if self.preprocessing is not None and "standardize" in self.model_fields_set:
            raise ValueError("give either standardize or preprocessing.scaling, not both")
        if self.preprocessing is not None and not self.own_tables:
            raise ValueError("preprocessing applies to own tables (tables or table)")
        if self.site_column is not None and self.site_column == self.label_column:
            raise ValueError(f"site_column and label_column are both {self.label_column!r}")
        if self.classes is not None and len(set(map(str, self.classes))) != len(self.classes):
            raise ValueError("classes must be distinct")
        if self.task == "regression" and not self.own_tables:
            raise ValueError("task: regression needs your own tables (tables or table): the built-in datasets are classification")
        if self.task == "regression" and self.classes is not None:
            raise ValueError("classes apply to classification; task: regression predicts a number")
        return self


class SimulationSpec(StrictSpec):
    """Flower simulation engine (Ray) resources: a Ray fedseek starts on this machine, or an existing cluster (`ray_address`)."""

    cpus_per_site: int = Field(1, ge=1)
    gpus_per_site: float = Field(0.0, ge=0.0, le=64.0, description="GPUs a virtual site's actor reserves (0.5: two sites per GPU)")
    ray_cpus: int | None = Field(None, ge=1, description="CPUs of the Ray fedseek starts; default: all cores")
    ray_address: str | None = Field(None, min_length=1, description="an existing Ray cluster (HOST:PORT of its head, or 'auto'); "
                                    "fedseek neither starts nor stops it")
    node_wait_s: float = Field(120.0, gt=0.0)

    @model_validator(mode="after")
    def _cluster_resources(self) -> SimulationSpec:
        if self.ray_address is not None and self.ray_cpus is not None:
            raise ValueError("ray_cpus sizes the Ray fedseek starts; with ray_address the cluster's own resources are used")
        return self


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
        d = self.data
        check_task_fit(self, d.task)
        if d.task == "regression" and self.partition.scheme == "dirichlet":
            raise ValueError("partition.scheme dirichlet splits by class; task: regression has no classes "
                             "(use iid or quantity, or a site_column)")
        if d.tables is not None or d.site_column is not None:
            if "partition" in self.model_fields_set:
                raise ValueError("partition does not apply when each site has its own table (tables, or table + site_column)")
            self.partition = PartitionSpec(scheme="natural")
        if d.tables is not None:
            if "num_sites" not in self.model_fields_set:
                self.num_sites = len(d.tables)
            elif self.num_sites != len(d.tables):
                raise ValueError(f"num_sites ({self.num_sites}) differs from the {len(d.tables)} files in data.tables "
                                 "(one file per site): leave num_sites out or make them agree")
        if not d.own_tables:
            rows = builtin_train_rows(d.dataset, d.test_fraction, d.options)
            if rows is not None and self.num_sites > rows:
                raise ValueError(f"num_sites ({self.num_sites}) exceeds the ~{rows} training rows of {d.dataset}: "
                                 "every site needs rows; lower num_sites")
            p = self.privacy
            if rows is not None and p is not None and p.enabled and p.delta * rows / self.num_sites >= 1.0:
                raise ValueError(f"privacy.delta {p.delta} is not below 1/n for the ~{rows // self.num_sites} rows of an average site: "
                                 "use a delta well below 1/n (a delta of 1/n lets a release expose a whole record)")
        self._distributed_fits()
        if self.strategy.min_sites > self.num_sites:
            raise ValueError(
                f"strategy.min_sites ({self.strategy.min_sites}) exceeds num_sites ({self.num_sites})"
            )
        return self


    def _distributed_fits(self) -> None:
        """privacy.mode distributed at the sites <-> secure_aggregation at the coordinator (filled in from the policy when absent)."""
        p, sa = self.privacy, self.secure_aggregation
        distributed = p is not None and p.enabled and p.mode == "distributed"
        if not distributed:
            if sa is not None and sa.enabled:
                raise ValueError("secure_aggregation needs sites whose policy is distributed DP: set privacy.mode: distributed")
            return
        assert p is not None
        if sa is None:
            sa = self.secure_aggregation = SecureAggregationSpec(min_sites=p.distributed.min_sites, colluders=p.distributed.colluders)
            if self.strategy.min_sites < sa.min_sites:
                self.strategy.min_sites = sa.min_sites
            self.check_secure_aggregation()
        if not sa.enabled:
            raise ValueError("privacy.mode distributed needs secure_aggregation enabled at the coordinator")
        if sa.min_sites < p.distributed.min_sites:
            raise ValueError(f"secure_aggregation.min_sites ({sa.min_sites}) is below privacy.distributed.min_sites "
                             f"({p.distributed.min_sites}): every site would refuse the round")
        expected = max(1, round(self.num_sites * self.strategy.fraction_train))
        if expected < sa.min_sites:
            raise ValueError(f"secure_aggregation.min_sites ({sa.min_sites}) exceeds the ~{expected} sites sampled per round "
                             f"(num_sites {self.num_sites} x strategy.fraction_train {self.strategy.fraction_train})")


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Load and validate a simulation scenario file; table paths become absolute (relative to the file).

    With `data.table` + `data.site_column`, num_sites is the number of distinct values in that
    column (read here, so a mismatch is one ConfigError before anything starts).
    """
    raw = load_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: empty scenario: give at least a name, or the keys you change from the defaults "
                          "(see simulations/hospitals.yaml)")
    cfg = parse(ScenarioConfig, raw, path)
    d, base = cfg.data, Path(path).resolve().parent
    if d.tables is not None:
        d.tables = [str(resolve_path(base, t)) for t in d.tables]
    d.table, d.test_table = resolve_path(base, d.table), resolve_path(base, d.test_table)
    if cfg.distill is not None:
        cfg.distill.teacher = str(resolve_path(base, cfg.distill.teacher))
    if d.site_column is not None:
        from fedseek.data.scenario_data import site_values  # reads the table (pandas): only for this kind of scenario

        try:
            n = len(site_values(str(d.table), d.site_column))
        except ValueError as exc:
            raise ConfigError(f"{path}: key 'data.table': {exc}") from None
        if "num_sites" not in cfg.model_fields_set:
            cfg.num_sites = n
        elif cfg.num_sites != n:
            raise ConfigError(f"{path}: key 'num_sites': {cfg.num_sites} differs from the {n} sites in column "
                              f"{d.site_column!r} of {d.table}: leave num_sites out or make them agree")
        if cfg.strategy.min_sites > cfg.num_sites:
            raise ConfigError(f"{path}: key 'strategy.min_sites': {cfg.strategy.min_sites} exceeds the {n} sites "
                              f"in column {d.site_column!r}")
    return cfg
