"""Typed records that cross the coordinator/site boundary, on Flower's ConfigRecord and MetricRecord.

The coordinator writes a `RoundConfig` into every TRAIN/EVALUATE message and the site reads
it back through the same class; a site writes `TrainMetrics` (or `RefusalMetrics`) and the
coordinator validates the reply with it. Keys on the wire are Flower's usual hyphenated names;
Python code uses the field names. Every value is bounded and finite, so a malformed record
fails in one place with a message naming the key.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedseek.wire.data_schema import DataSchema

# Bounds on every number a site reports (a site may send anything: values beyond these are a RecordError, not an overflow later)
MAX_EXAMPLES = 10**9  # records one site may claim to have trained or evaluated on in one round
MAX_COUNT = 10**12  # steps, bytes
MAX_EPSILON = 1e6  # any epsilon a ledger reports (a real budget is single digits)
MAX_REAL = 1e12  # any other reported real: losses, seconds, noisy counts

CONFIG = "config"  # RecordDict keys of a round's messages
METRICS = "metrics"
SITE = "site"
STATUS = "status"


class RecordError(ValueError):
    """A record that does not match its schema (the message names the key)."""


MAX_JSON_TEXT = 4_000_000  # characters of a JSON-valued config key a site parses


def _json_keys(d: dict[str, Any], keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """Decode the config keys that travel as JSON text (bounded size); RecordError naming the key."""
    for key in keys:
        if isinstance(d.get(key), str):
            text = str(d[key])
            if len(text) > MAX_JSON_TEXT:
                raise RecordError(f"{what} key {key!r}: {len(text)} characters (at most {MAX_JSON_TEXT})")
            try:
                d[key] = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                raise RecordError(f"{what} key {key!r}: not JSON") from None
    return d


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", allow_inf_nan=False, frozen=True)

    @classmethod
    def _parse(cls, data: dict[str, Any], what: str) -> Any:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(record)"
            raise RecordError(f"{what} key {key!r}: {err['msg']}") from None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: hyphenated keys, optional values left out."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ModelMeta(_Wire):
    """The architecture a site builds before loading the global weights (also saved as model.json)."""

    kind: str
    hidden: list[Annotated[int, Field(ge=1, le=65_536)]] = Field([64], max_length=64)  # bounded: a site builds what it is told
    width: int = Field(16, ge=4, le=1024, multiple_of=4)  # cnn only
    input_shape: list[int]
    num_classes: int = Field(ge=1)  # outputs: classes, or 1 for regression
    task: str = Field("classification", pattern="^(classification|regression)$")

    @model_validator(mode="after")
    def _outputs(self) -> ModelMeta:
        if (self.task == "regression") != (self.num_classes == 1):
            raise ValueError("a regression model has exactly one output; a classifier at least two")
        return self


class DistillMeta(_Wire):
    """Federated distillation: the teacher's architecture (its weights travel in the "teacher" ArrayRecord) and the loss."""

    teacher: ModelMeta
    temperature: float = Field(gt=0, le=100)
    alpha: float = Field(ge=0, le=1)


class FittedScaling(_Wire):
    """The federation's fitted scaling statistics, sent with every round: feature (or label column) name -> mean / std."""

    mean: dict[str, Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] = Field(default_factory=dict, max_length=100_000)
    std: dict[str, Annotated[float, Field(gt=0, le=MAX_REAL)]] = Field(default_factory=dict, max_length=100_000)


class RoundConfig(_Wire):
    """What the coordinator asks of a site in one round (the "config" ConfigRecord)."""

    server_round: int = Field(alias="server-round", ge=1)
    num_rounds: int = Field(alias="num-rounds", ge=1)
    lr: float = Field(gt=0)
    local_epochs: int = Field(alias="local-epochs", ge=1)
    batch_size: int = Field(alias="batch-size", ge=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    weighting: str = "none"
    proximal_mu: float = Field(0.0, alias="proximal-mu", ge=0)
    recipe: str = Field("fixed", pattern="^(fixed|auto)$")  # auto: a DP site derives batch, epochs and lr itself
    model: ModelMeta
    seed: int = 0
    run_id: str = Field("", alias="run-id")
    codec: dict[str, Any] = {}
    data_schema: DataSchema | None = Field(None, alias="data-schema")  # what the site's data must look like
    scaling: FittedScaling | None = None  # scaling: federated: the statistics the sites computed before round 1
    distill: DistillMeta | None = None  # distill: train the model on the teacher's softened answers too

    def to_record(self) -> ConfigRecord:
        """The ConfigRecord form (flat: the model, codec, data schema, scaling and distillation travel as JSON text)."""
        d = self.to_dict()
        d["model"] = json.dumps(self.model.to_dict())
        d["codec"] = json.dumps(self.codec)
        if self.data_schema is not None:
            d["data-schema"] = self.data_schema.model_dump_json()
        if self.scaling is not None:
            d["scaling"] = self.scaling.model_dump_json()
        if self.distill is not None:
            d["distill"] = json.dumps(self.distill.to_dict())
        return ConfigRecord(d)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> RoundConfig:
        """Parse and validate the coordinator's round config; RecordError naming the key otherwise."""
        d = _json_keys(dict(rec), ("model", "codec", "data-schema", "scaling", "distill"), "round config")
        parsed: RoundConfig = cls._parse(d, "round config")
        return parsed


class TrainMetrics(_Wire):
    """A trained site's reply metrics; the DP fields are present when the site trains under DP-SGD."""

    num_examples: int = Field(alias="num-examples", gt=0, le=MAX_EXAMPLES)
    train_loss: float | None = Field(None, alias="train-loss", ge=-MAX_REAL, le=MAX_REAL,
                                     description="non-DP sites only: an unnoised function of the records")
    train_seconds: float = Field(0.0, alias="train-seconds", ge=0, le=MAX_REAL)
    steps: int = Field(0, ge=0, le=MAX_COUNT)
    payload_bytes: int = Field(0, alias="payload-bytes", ge=0, le=MAX_COUNT)
    dense_bytes: int = Field(0, alias="dense-bytes", ge=0, le=MAX_COUNT)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    delta: float | None = Field(None, ge=0, le=1)
    noise_multiplier: float | None = Field(None, alias="noise-multiplier", ge=0, le=MAX_REAL)
    sample_rate: float | None = Field(None, alias="sample-rate", ge=0, le=1)
    dp_steps: int | None = Field(None, alias="dp-steps", ge=0, le=MAX_COUNT)
    dp_steps_total: int | None = Field(None, alias="dp-steps-total", ge=0, le=MAX_COUNT)
    epsilon_budget: float | None = Field(None, alias="epsilon-budget", ge=0, le=MAX_EPSILON)
    local_epsilon: float | None = Field(None, alias="local-epsilon", ge=0, le=MAX_REAL,
                                        description="distributed DP: the site's epsilon counting only its own noise share")

    def to_record(self) -> MetricRecord:
        """The MetricRecord form."""
        return MetricRecord(self.to_dict())

    @classmethod
    def from_record(cls, rec: MetricRecord) -> TrainMetrics:
        """Validate a site's metrics; RecordError naming the key otherwise."""
        parsed: TrainMetrics = cls._parse(dict(rec), "reply metrics")
        return parsed


class RefusalMetrics(_Wire):
    """What a site that refuses a round (privacy budget, delta too large) reports about its ledger."""

    num_examples: int = Field(0, alias="num-examples", ge=0, le=MAX_EXAMPLES)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    delta: float | None = Field(None, ge=0, le=1)
    epsilon_budget: float | None = Field(None, alias="epsilon-budget", ge=0, le=MAX_EPSILON)
    projected_epsilon: float | None = Field(None, alias="projected-epsilon", ge=0, le=MAX_REAL)

    @classmethod
    def from_record(cls, rec: MetricRecord) -> RefusalMetrics:
        """Validate a refusal's metrics; RecordError naming the key otherwise."""
        parsed: RefusalMetrics = cls._parse(dict(rec), "refusal metrics")
        return parsed


class EvalConfig(_Wire):
    """What the coordinator asks of a site in a federated evaluation (the "config" ConfigRecord of an EVALUATE message)."""

    server_round: int = Field(alias="server-round", ge=1)
    model: ModelMeta
    run_id: str = Field("", alias="run-id")
    data_schema: DataSchema | None = Field(None, alias="data-schema")  # what the site's data must look like
    scaling: FittedScaling | None = None  # scaling: federated: the statistics the sites computed before round 1

    def to_record(self) -> ConfigRecord:
        """The ConfigRecord form (the model, data schema and scaling travel as JSON text)."""
        d = self.to_dict()
        d["model"] = json.dumps(self.model.to_dict())
        if self.data_schema is not None:
            d["data-schema"] = self.data_schema.model_dump_json()
        if self.scaling is not None:
            d["scaling"] = self.scaling.model_dump_json()
        return ConfigRecord(d)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> EvalConfig:
        """Parse and validate an evaluation request; RecordError naming the key otherwise."""
        d = _json_keys(dict(rec), ("model", "data-schema", "scaling"), "evaluation config")
        parsed: EvalConfig = cls._parse(d, "evaluation config")
        return parsed


class EvalMetrics(_Wire):
    """A site's evaluation of the global model on its held-out split (never trained on).

    Under DP every count and the loss sum carry Gaussian noise of std `noise_std` (sensitivity
    sqrt(3): one record moves its class count, its class's correct count and the clipped loss
    sum by at most 1, 1 and `loss_clip`/`loss_clip`), charged to the site's evaluation ledger;
    a non-DP site replies exact values and `noise_std` 0. `num_examples` (the held-out size) is
    public: it follows from the public record count and the site's declared holdout fraction.

    A regression site instead releases `target_sums`: with L = loss_clip, the sums over its held-out
    records of min(e^2, L)/L, min(|e|, sqrt L)/sqrt L, clip(y, +-sqrt L)/sqrt L and min(y^2, L)/L
    (e the residual, y the target, in the model's units): one record moves each by at most 1
    (sensitivity 2), each with noise std `noise_std` under DP; `class_counts` is then [num_examples]
    and `class_correct` [0], exact (the held-out size is public).
    """

    num_examples: int = Field(alias="num-examples", ge=0, le=MAX_EXAMPLES)
    class_counts: list[Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] = Field(alias="class-counts", max_length=10000)
    class_correct: list[Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] = Field(alias="class-correct", max_length=10000)
    loss_sum: float = Field(alias="loss-sum", ge=-MAX_REAL, le=MAX_REAL)
    loss_clip: float = Field(alias="loss-clip", gt=0, le=MAX_REAL)
    target_sums: list[Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] | None = Field(None, alias="target-sums", max_length=4)
    noise_std: float = Field(0.0, alias="noise-std", ge=0, le=MAX_REAL)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    delta: float | None = Field(None, ge=0, le=1)
    epsilon_budget: float | None = Field(None, alias="epsilon-budget", ge=0, le=MAX_EPSILON)

    def to_record(self) -> MetricRecord:
        """The MetricRecord form."""
        return MetricRecord(self.to_dict())

    @classmethod
    def from_record(cls, rec: MetricRecord) -> EvalMetrics:
        """Validate a site's evaluation metrics; RecordError naming the key otherwise."""
        parsed: EvalMetrics = cls._parse(dict(rec), "evaluation metrics")
        if len(parsed.class_counts) != len(parsed.class_correct):
            raise RecordError("evaluation metrics key 'class-correct': length differs from 'class-counts'")
        if parsed.target_sums is not None and len(parsed.target_sums) != 4:
            raise RecordError("evaluation metrics key 'target-sums': 4 values expected")
        return parsed


class StatsRequest(_Wire):
    """The coordinator's request for scaling statistics before round 1 (a "query.stats" message, scaling: federated).

    `columns` are numeric feature names (and, for regression, the label column as `target`);
    `bounds` (column -> [low, high]) clip each value for the sums; under DP a site requires them.
    """

    run_id: str = Field("", alias="run-id")
    columns: list[str] = Field(min_length=1, max_length=100_000)
    target: str | None = None
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict, max_length=100_000)
    data_schema: DataSchema | None = Field(None, alias="data-schema")

    def to_record(self) -> ConfigRecord:
        """The ConfigRecord form (lists and dicts travel as JSON text)."""
        d: dict[str, Any] = {"run-id": self.run_id, "columns": json.dumps(self.columns), "bounds": json.dumps(self.bounds)}
        if self.target is not None:
            d["target"] = self.target
        if self.data_schema is not None:
            d["data-schema"] = self.data_schema.model_dump_json()
        return ConfigRecord(d)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> StatsRequest:
        """Parse and validate a statistics request; RecordError naming the key otherwise."""
        parsed: StatsRequest = cls._parse(_json_keys(dict(rec), ("columns", "bounds", "data-schema"), "statistics request"),
                                          "statistics request")
        return parsed


class StatsReply(_Wire):
    """A site's scaling statistics: per requested column (and the target last), the sum and the sum of squares.

    Without DP they are exact sums of the raw values. Under DP each value is clipped into its
    column's [low, high] and centred at the midpoint, the sums are divided by the half-range r
    (and r^2), so one record moves each by at most 1, and every entry carries Gaussian noise of
    std `noise_std`; the release is charged to the site's training ledger before it is computed.
    `num_examples` (the site's record count) is public, as in training replies.
    """

    num_examples: int = Field(alias="num-examples", gt=0, le=MAX_EXAMPLES)
    sums: list[Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] = Field(max_length=100_001)
    squares: list[Annotated[float, Field(ge=-MAX_REAL, le=MAX_REAL)]] = Field(max_length=100_001)
    normalized: int = Field(0, ge=0, le=1)  # 1: centred at the bounds' midpoints and divided by the half-range (DP form)
    noise_std: float = Field(0.0, alias="noise-std", ge=0, le=MAX_REAL)
    epsilon: float | None = Field(None, ge=0, le=MAX_EPSILON)
    delta: float | None = Field(None, ge=0, le=1)

    def to_record(self) -> MetricRecord:
        """The MetricRecord form."""
        return MetricRecord(self.to_dict())

    @classmethod
    def from_record(cls, rec: MetricRecord) -> StatsReply:
        """Validate a site's statistics; RecordError naming the key otherwise."""
        parsed: StatsReply = cls._parse(dict(rec), "statistics reply")
        if len(parsed.sums) != len(parsed.squares):
            raise RecordError("statistics reply key 'squares': length differs from 'sums'")
        return parsed


def site_record(name: str) -> ConfigRecord:
    """The "site" record a site attaches to every reply."""
    return ConfigRecord({"name": name})


def site_name(content: RecordDict) -> str:
    """The site name a reply carries ("" when it carries none)."""
    rec = content.config_records.get(SITE)
    return str(rec.get("name", ""))[:200] if rec is not None else ""


def refusal_reason(content: RecordDict) -> str | None:
    """The reason of a refusal reply, None for any other reply."""
    rec = content.config_records.get(STATUS)
    if rec is None or not rec.get("refused"):
        return None
    return str(rec.get("refused"))[:500]


def refusal_content(reason: str, metrics: RefusalMetrics, name: str) -> RecordDict:
    """A refusal reply: a normal reply with a status, never an error."""
    return RecordDict({METRICS: MetricRecord(metrics.to_dict()), SITE: site_record(name), STATUS: ConfigRecord({"refused": reason})})
