"""What a federation runs, shared by simulated scenarios and the deployed coordinator.

Model, strategy, local training, privacy policy, reply screening, sparsity, compression and watermark.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedseek.config.loading import StrictSpec, check_site_name
from fedseek.names import SPARSE_CODECS, AccountantName, CodecName, IndexCoding, ModelKind, QuantizerName, StrategyName


class ModelSpec(StrictSpec):
    """Architecture of the shared model; the coordinator sends it to sites each round."""

    kind: ModelKind = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64], description="mlp: the hidden layers' widths")
    width: int = Field(16, ge=4, le=1024, multiple_of=4, description="cnn: channels of the first conv block (the second has twice)")


class StrategySpec(StrictSpec):
    """Aggregation rule, built on Flower's strategies."""

    name: StrategyName = "fedavg"
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_sites: int = Field(2, ge=1, description="sites needed before a round starts")
    proximal_mu: float = Field(0.0, ge=0.0)
    server_lr: float | None = Field(None, gt=0.0, description="server learning rate (fedadam eta, default 0.01; fedavgm, default 1.0)")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="fedavgm: momentum of the server's update over rounds")
    server_tau: float = Field(1e-3, gt=0.0, description="FedAdam tau")
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="> 0: the released model is an exponential moving average of the global models "
        "(sites train from the latest; under DP the average cancels part of the noise)")
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="FedTrimmedAvg: share cut at each end")
    num_malicious: int = Field(0, ge=0, description="Krum/MultiKrum: assumed Byzantine sites")
    num_to_select: int = Field(1, ge=1, description="MultiKrum: updates averaged")


class TrainSpec(StrictSpec):
    """Local training recipe the coordinator sends to sites each round."""

    local_epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(0.1, gt=0.0)
    batch_size: int = Field(32, ge=1)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    class_weighting: Literal["none", "balanced"] = "none"
    recipe: Literal["fixed", "auto"] = Field(
        "fixed", description="auto: a DP site sets its own batch (all its records, up to its max_batch_size), one local epoch "
        "and lr 0.5 / max_grad_norm; sites without DP use the recipe above")


class EvaluationPrivacySpec(StrictSpec):
    """How a DP site answers federated evaluation: noisy counts on its held-out split, charged to a separate ledger.

    Training and held-out records are disjoint, so per record the guarantee is the larger of the
    training and the evaluation epsilon (parallel composition).
    """

    epsilon_budget: float = Field(3.0, gt=0.0, description="lifetime epsilon of the evaluation ledger")
    planning_releases: int = Field(6, ge=1, le=100000, description="evaluations the site plans its evaluation budget over")
    loss_clip: float = Field(5.0, gt=0.0, description="per-record loss is clipped to [0, loss_clip] before summing")


class SecureSumTrust(StrictSpec):
    """How many sites a secure sum must hold, and how many of them may collude with the coordinator."""

    min_sites: int = Field(3, ge=3, le=1000, description="the fewest sites whose updates (noise shares) must be in every sum the "
                           "coordinator unmasks; the coordinator never unmasks, and a site withholds its key shares, with fewer")
    colluders: int = Field(0, ge=0, le=997, description="sites assumed to collude with the coordinator: the key-share threshold is "
                           "above it, and each site adds noise for min_sites - colluders honest sites")

    @model_validator(mode="after")
    def _fewer_colluders(self) -> SecureSumTrust:
        if self.colluders >= self.min_sites:
            raise ValueError(f"colluders ({self.colluders}) must be below min_sites ({self.min_sites})")
        return self


class DistributedPrivacySpec(SecureSumTrust):
    """mode distributed: what the site trusts about the secure sum its noise share hides in (its own policy)."""

    @property
    def honest(self) -> int:
        """Sites whose noise the sum is guaranteed to hold beyond the colluders' view."""
        return self.min_sites - self.colluders


class PrivacySpec(StrictSpec):
    """A site's record-level DP policy (Opacus DP-SGD), owned by the site.

    Noise: a fixed `noise_multiplier`, or `target_epsilon_per_round`, or neither, in which
    case the site calibrates the noise so the coordinator's announced rounds fit its budget.
    """

    enabled: bool = True
    mode: Literal["local", "distributed"] = Field(
        "local", description="local: every update leaves the site carrying the full DP noise; distributed: one clipped full-batch "
        "step per round with a noise share, released only inside a SecAgg+ sum (see docs/privacy.md)")
    distributed: DistributedPrivacySpec = Field(default_factory=lambda: DistributedPrivacySpec())
    epsilon_budget: float = Field(3.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon_per_round: float | None = Field(None, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: AccountantName = Field(
        "prv", description="prv: Opacus' PRV accountant (the tightest, cross-checked against Google dp-accounting's PLD: ~7% less "
        "noise for the same epsilon than rdp); rdp: Renyi DP. A ledger keeps the accountant it was started with")
    grad_sample_mode: Literal["ghost", "hooks", "functorch", "ew"] = "ghost"
    planning_rounds: int = Field(
        10, ge=1, le=100000, description="rounds the site plans its budget over (its own horizon: the coordinator's num-rounds is ignored)"
    )
    max_epsilon_per_round: float | None = Field(None, gt=0.0, description="no round may spend more (noise is raised to fit)")
    max_local_epochs: int = Field(10, ge=1, le=1000, description="a round asking for more local epochs is refused")
    max_batch_size: int = Field(1024, ge=1, description="a round asking for a larger expected batch is refused")
    class_weights: list[float] | None = Field(
        None, description="fixed loss weights per class from the site's own policy (never from private label counts)"
    )
    evaluation: EvaluationPrivacySpec = Field(default_factory=lambda: EvaluationPrivacySpec())
    scaling_epsilon: float = Field(
        0.5, gt=0.0, le=10.0, description="epsilon of the one statistics release of scaling: federated (on its own, at this delta); "
        "charged to the training ledger, where it composes with DP-SGD (0.5 adds ~0.05 to a 3.0 training budget)")

    @model_validator(mode="after")
    def _one_noise_rule(self) -> PrivacySpec:
        if self.noise_multiplier is not None and self.target_epsilon_per_round is not None:
            raise ValueError("set at most one of noise_multiplier and target_epsilon_per_round")
        if self.class_weights is not None and any(not (w > 0 and w < 1e6) for w in self.class_weights):
            raise ValueError("class_weights must be positive and below 1e6")
        return self


class ValidationSpec(StrictSpec):
    """Bounds the coordinator enforces on every site reply before aggregation, and on the aggregate after it.

    By default one site's influence is bounded: its update norm by `norm_multiple` x the round's
    median update norm (above: rejected), its weight by `weight_multiple` x the round's median
    num-examples (above: counted at the bound). `norm_bound: off` and `weight_multiple: null`
    turn these off; `max_update_norm` is a fixed bound that applies in addition.
    """

    max_update_norm: float | None = Field(None, gt=0.0, description="fixed L2 bound on a site's model delta (with or without norm_bound)")
    max_payload_bytes: int | None = Field(None, gt=0, description="default: 2x the dense fp32 model")
    norm_bound: Literal["adaptive", "off"] = Field(
        "adaptive", description="adaptive: an update above norm_multiple x the round's median update norm is rejected"
    )
    norm_multiple: float = Field(3.0, gt=1.0, le=1e6, description="adaptive norm bound: multiple of the round's median update norm")
    weight_multiple: float | None = Field(
        3.0, ge=1.0, le=1e6, description="a site counts for at most this multiple of the round's median num-examples; null = as reported"
    )
    max_examples: dict[str, int] = Field(
        default_factory=dict, description="site name -> most num-examples counted for it (declared by the federation)"
    )
    max_global_abs: float | None = Field(
        1e6, gt=0.0, description="an aggregate with a non-finite weight, all weights zero, or one above this is discarded (model kept)"
    )

    @field_validator("norm_bound", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("max_examples")
    @classmethod
    def _declared(cls, value: dict[str, int]) -> dict[str, int]:
        for name, n in value.items():
            try:
                check_site_name(name)
            except ValueError as exc:
                raise ValueError(f"max_examples key {name!r}: {exc}") from None
            if not 0 < n <= 10**9:
                raise ValueError(f"max_examples for {name!r} must be in 1..1e9, got {n}")
        return value


class MetricsSpec(StrictSpec):
    """Prometheus endpoint of the coordinator (off unless a port is given)."""

    prometheus_port: int | None = Field(None, ge=0, le=65535, description="0 = pick a free port")
    prometheus_host: str = "127.0.0.1"


class SparsitySpec(StrictSpec):
    """A global sparsity mask held by the coordinator (from the seed or the DP global model only)."""

    enabled: bool = False
    target: float = Field(0.8, ge=0.0, lt=1.0, description="final fraction of weights pruned")
    schedule: Literal["fixed", "progressive"] = "progressive"
    start_round: int = Field(1, ge=1)
    end_fraction: float = Field(0.75, gt=0.0, le=1.0, description="share of rounds by which target is reached")
    regrow_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="prune-and-regrow share per round after the ramp")


class CompressionSpec(StrictSpec):
    """Update encoding on the wire (after DP, so post-processing)."""

    codec: CodecName = "none"
    topk_fraction: float = Field(0.1, gt=0.0, le=1.0)
    quantize: QuantizerName = "none"
    error_feedback: bool = True
    index_coding: IndexCoding = "delta"
    downlink: Literal["none", "fp16"] = "none"

    @model_validator(mode="after")
    def _valid_codec(self) -> CompressionSpec:
        if self.quantize != "none" and self.codec not in SPARSE_CODECS:
            raise ValueError(f"quantize applies to codec topk or sparse_mask only (codec is {self.codec!r})")
        self.codec_spec(0)  # raises ValueError with the allowed combinations
        return self

    def codec_spec(self, seed: int) -> Any:
        """The fedseek.wire.codec.CodecSpec for site uplinks."""
        from fedseek.wire.codec import CodecSpec

        return CodecSpec(
            kind=self.codec,
            topk_fraction=self.topk_fraction,
            quantize=self.quantize if self.codec in SPARSE_CODECS else "none",
            error_feedback=self.error_feedback and self.codec != "none",
            seed=seed,
            index_coding=self.index_coding,
        )


class WatermarkSpec(StrictSpec):
    """Coordinator-side ownership watermark (trigger set), embedded after every aggregation."""

    enabled: bool = False
    key_file: str | None = Field(None, description="secret key (fedseek watermark keygen); default OUT/watermark.key")
    triggers: int | None = Field(None, ge=10)
    target_trigger_accuracy: float = Field(0.98, gt=0.0, le=1.0)
    max_steps: int = Field(600, ge=1, description="embedding steps per round at most (the first rounds need the most)")
    lr: float = Field(0.05, gt=0.0, description="embedding SGD learning rate (steps are clipped to gradient norm 0.5)")
    distill_weight: float = Field(
        10.0, ge=0.0, description="weight of the distillation term that holds the task function in place"
    )
    alpha: float = Field(1e-6, gt=0.0, lt=1.0)


class DistillSpec(StrictSpec):
    """Federated knowledge distillation: this run's (smaller) model is a student of a finished run's model.

    Every site trains the student on its own records with loss alpha * CE + (1 - alpha) * T^2 * KL
    against the teacher's answers softened by T, computed at the site on its own records (nothing
    about them leaves the site but the DP update). Under DP the rounds are charged to the site's
    ledger like any training round; the teacher's weights are already shared with every site.
    """

    teacher: str = Field(description="a finished run directory holding model.pt and model.json (its kept model is the teacher)")
    temperature: float = Field(3.0, gt=0.0, le=100.0, description="softens teacher and student distributions (T)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the hard-label cross-entropy; 1 - alpha weighs T^2 * KL")


class FederatedEvaluationSpec(StrictSpec):
    """Federated evaluation the coordinator requests: every `every` rounds (and after the last), on the sites' held-out splits."""

    every: int = Field(0, ge=0, le=100000, description="0 = off")
    holdout_fraction: float = Field(
        0.2, gt=0.0, lt=0.9, description="simulated sites hold this fraction of their records out of training when evaluation is on"
    )


class SelectionSpec(StrictSpec):
    """Which round's model the run keeps as model.pt: judged on the central test set or the federated evaluation.

    `metric: last` keeps the last round (model_last.pt is then the same model). Otherwise the
    best round by `metric` is model.pt and the last one model_last.pt; `patience` stops the run
    after that many judged rounds without an improvement of at least `min_delta`. `source:
    central` judges every round on the coordinator's test set (whose score of the chosen model is
    then optimistic: judge it on another table); `source: federated` judges the rounds with a
    federated evaluation (`evaluation.every`) on the sites' held-out splits: noisy under DP, but
    not the set the final figures are reported on, and already paid for in the sites' evaluation
    ledgers (choosing a round from released numbers is post-processing).
    """

    metric: Literal["last", "accuracy", "balanced_accuracy", "auc", "loss", "r2", "rmse", "mae"] = "last"
    source: Literal["central", "federated"] = "central"
    patience: int | None = Field(None, ge=1, le=100000, description="stop after this many rounds without improvement")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement")

    @model_validator(mode="after")
    def _patience_needs_metric(self) -> SelectionSpec:
        if self.patience is not None and self.metric == "last":
            raise ValueError("patience needs a metric to watch (accuracy, balanced_accuracy, auc, loss; r2, rmse, mae), not 'last'")
        if self.source == "federated" and self.metric == "auc":
            raise ValueError("the federated evaluation reports accuracy, balanced_accuracy, loss (and r2, rmse, mae), not auc")
        return self


CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auc")
REGRESSION_METRICS = ("r2", "rmse", "mae")


def check_task_fit(fed: FederationSpec, task: str) -> None:
    """Refuse federation settings that do not apply to the task (ValueError naming the key); a regression has no classes."""
    metric = fed.selection.metric
    if task == "regression":
        if metric in CLASSIFICATION_METRICS:
            raise ValueError(f"selection.metric {metric!r} is for classification; with task: regression use "
                             f"{', '.join(('loss',) + REGRESSION_METRICS)} or last")
        if fed.train.class_weighting != "none":
            raise ValueError("train.class_weighting applies to classification; task: regression has no classes")
        if fed.watermark.enabled:
            raise ValueError("watermark: the trigger-set watermark marks class answers; it is not available with task: regression")
        if fed.distill is not None:
            raise ValueError("distill: knowledge distillation softens class answers; it is not available with task: regression")
    elif metric in REGRESSION_METRICS:
        raise ValueError(f"selection.metric {metric!r} is for task: regression; for classification use "
                         f"{', '.join(CLASSIFICATION_METRICS + ('loss',))} or last")


class SecureAggregationSpec(SecureSumTrust):
    """The coordinator's side of distributed DP: rounds aggregated with Flower's SecAgg+ (only the sum is unmasked)."""

    enabled: bool = True
    clipping_range: float = Field(64.0, gt=0.0, le=1e6, description="SecAgg+ quantizes each value a site sends into "
                                  "[-clipping_range, clipping_range] (2^22 levels)")


SECURE_RULES = ("fedavg", "fedavgm", "fedadam")  # rules that take the secure mean as one update (robust rules need each reply)


class FederationSpec(StrictSpec):
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
    evaluation: FederatedEvaluationSpec = Field(default_factory=FederatedEvaluationSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    distill: DistillSpec | None = Field(None, description="train this run's model as a student of a finished run's model")
    secure_aggregation: SecureAggregationSpec | None = Field(
        None, description="distributed DP: each round's updates are summed with Flower's SecAgg+ and only the sum is unmasked")

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> FederationSpec:
        self.check_secure_aggregation()
        return self

    def check_secure_aggregation(self) -> None:
        """ValueError when secure aggregation is on with a rule, codec or site count it cannot serve."""
        sa = self.secure_aggregation
        if sa is None or not sa.enabled:
            return
        if self.strategy.name not in SECURE_RULES:
            raise ValueError(f"secure_aggregation: strategy {self.strategy.name!r} needs each site's update; the coordinator sees "
                             f"only the sum (use one of {', '.join(SECURE_RULES)})")
        if self.compression.codec != "none":
            raise ValueError(f"secure_aggregation: compression.codec {self.compression.codec!r} does not apply (SecAgg+ sums dense "
                             "quantized vectors); use none")
        if self.strategy.min_sites < sa.min_sites:
            raise ValueError(f"strategy.min_sites ({self.strategy.min_sites}) is below secure_aggregation.min_sites ({sa.min_sites}): "
                             "a round could start with fewer sites than the sum needs")
        if self.distill is not None:
            raise ValueError("secure_aggregation: distill is not supported in distributed mode")

    @model_validator(mode="after")
    def _federated_selection_needs_evaluation(self) -> FederationSpec:
        if self.selection.source == "federated" and self.selection.metric != "last" and self.evaluation.every <= 0:
            raise ValueError("selection.source federated needs a federated evaluation: set evaluation.every (e.g. 1)")
        if self.strategy.ema_decay > 0 and self.watermark.enabled:
            raise ValueError("strategy.ema_decay: the watermark is embedded in each round's global model, not in the released "
                             "average; use one or the other")
        return self
