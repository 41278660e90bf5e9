"""The run's output records: one metrics.jsonl row per round and summary.json, as typed models.

The coordinator writes them, and `fedseek simulate/run` (follow), `fedseek report`, the
Prometheus exporter and the tests read them through these same classes. Field names are the
files' field names (per-site views keep their hyphenated keys through aliases), and every
record carries `schema_version` so a reader can tell which layout it holds. The version is
bumped only when a field is removed or changes meaning: an added optional field (such as
`federated` / `federated_evaluation`) keeps it, since older files read with the default and
older readers ignore the new key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

SCHEMA_VERSION = 1
Metrics = dict[str, float | None]  # evaluate(): loss, accuracy, balanced_accuracy, auc (binary tasks)


class SchemaError(ValueError):
    """A run file that is not a fedseek run record (or a newer layout): one line naming the file and field."""


class _Record(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class SiteIssue(_Record):
    """A site named with the reason it failed or refused a round."""

    site: str = ""
    reason: str = ""


class Rejection(SiteIssue):
    """An update rejected by screening (malformed, oversized, non-finite, above the norm bound)."""

    node_id: int = 0


class RoundRejection(Rejection):
    """A rejection in the run summary, with its round."""

    round: int = 0


class SiteRoundView(_Record):
    """One site's line in a round row: DP accounting it reported (trained) or its refusal facts."""

    status: Literal["trained", "refused"]
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = Field(None, alias="noise-multiplier")
    sample_rate: float | None = Field(None, alias="sample-rate")
    dp_steps: int | None = Field(None, alias="dp-steps")
    dp_steps_total: int | None = Field(None, alias="dp-steps-total")
    train_loss: float | None = Field(None, alias="train-loss")
    num_examples: int | None = Field(None, alias="num-examples")
    epsilon_budget: float | None = Field(None, alias="epsilon-budget")
    projected_epsilon: float | None = Field(None, alias="projected-epsilon")
    local_epsilon: float | None = Field(None, alias="local-epsilon")  # distributed DP: the site's own share alone


class WatermarkRound(_Record):
    """The watermark embedding step of one round (coordinator-side, no site data)."""

    steps: int
    trigger_accuracy_before: float
    trigger_accuracy: float
    matches: int
    n: int
    p_value: float
    detected: bool
    seconds: float


EvalStatus = Literal["evaluated", "refused", "rejected", "failed", "timed_out"]
#: completed: every round ran and some update was accepted; stopped: it ended before the last round (no site left to
#: ask) after accepting some update; failed: no update was accepted in any round (the model is the initial one).
RunStatusName = Literal["completed", "stopped", "failed"]


class SiteEval(_Record):
    """One site's answer to a federated evaluation: its own estimate (DP-noised when noise_std > 0) or why there is none."""

    status: EvalStatus
    accuracy: float | None = None  # correct / count on its held-out split, clipped to [0, 1]
    accuracy_std: float | None = None  # noise std of that estimate (delta method, see runtime.federated_eval)
    count: float | None = None  # the noisy held-out count it released (sum over classes)
    num_examples: int | None = None  # its public held-out size
    noise_std: float | None = None  # std of the Gaussian noise on each released count
    epsilon: float | None = None  # its evaluation ledger's epsilon, as reported
    delta: float | None = None
    epsilon_budget: float | None = None
    reason: str = ""  # refused / rejected / failed: why


class FederatedEvalRow(_Record):
    """A federated evaluation after a round: the sites' held-out counts pooled, each estimate with its noise std."""

    round: int
    seconds: float = 0.0
    sampled: int = 0
    evaluated: int = 0
    refused: int = 0
    rejected: int = 0
    failed: int = 0
    timed_out: int = 0
    accuracy: float | None = None  # sum(correct) / sum(counts), clipped to [0, 1]
    accuracy_std: float | None = None
    balanced_accuracy: float | None = None  # mean over classes of pooled correct / pooled count
    balanced_accuracy_std: float | None = None
    loss: float | None = None  # sum(clipped loss sums) / sum(counts), clipped to [0, max loss_clip]
    loss_std: float | None = None
    count: float | None = None  # pooled (noisy) held-out count
    r2: float | None = None  # regression: 1 - pooled MSE / pooled target variance (loss is the MSE)
    rmse: float | None = None
    mae: float | None = None
    num_examples: int = 0  # pooled public held-out size
    noisy: bool = False  # some site added DP noise: every estimate is a noisy one
    bytes_down: int = 0  # the global model sent to the evaluating sites
    sites: dict[str, SiteEval] = {}


class SiteEvalSummary(_Record):
    """A site's federated evaluations over the run; epsilon is its evaluation ledger's (separate from training)."""

    evaluations: int = 0
    refusals: int = 0
    rejections: int = 0
    failures: int = 0
    epsilon: float | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    last_accuracy: float | None = None
    last_round: int | None = None
    last_status: str = ""
    excluded: str = ""  # refused evaluation: not asked again (the reason)


class FederatedEvalSummary(_Record):
    """summary.json's `federated_evaluation`: the last pooled estimates and each site's evaluation spend."""

    every: int = 0
    rounds: list[int] = []  # rounds after which the sites evaluated
    last: FederatedEvalRow | None = None  # the last evaluation (its own per-site answers included)
    max_epsilon: float | None = None  # the largest evaluation epsilon any site reported
    sites: dict[str, SiteEvalSummary] = {}


class MetricsRow(_Record):
    """One line of metrics.jsonl: what happened in one round."""

    schema_version: int = SCHEMA_VERSION
    round: int
    time: float
    round_seconds: float
    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    refused: int = 0
    failed: int = 0
    timed_out: int = 0
    timed_out_sites: list[str] = []
    skipped_sites: list[str] = []  # left out of this round: backing off after time-outs in earlier rounds
    failures: list[SiteIssue] = []
    rejections: list[Rejection] = []
    refusals: list[SiteIssue] = []
    bounded: list[SiteIssue] = []  # accepted updates counted with less weight than reported (validation.weight_multiple / max_examples)
    model_kept: str | None = None  # why this round's aggregate was discarded and the previous global model kept
    train_loss: float | None = None
    central: Metrics = {}
    bytes_up: int = 0
    wire_bytes_up: int = 0
    bytes_down: int = 0
    codec: str = "none"
    sparsity: float = 0.0
    watermark: WatermarkRound | None = None
    sites: dict[str, SiteRoundView] = {}
    federated: FederatedEvalRow | None = None  # the federated evaluation after this round (None: none was due)

    @field_serializer("sites")
    def _sites(self, sites: dict[str, SiteRoundView]) -> dict[str, dict[str, Any]]:
        return {k: v.model_dump(by_alias=True, exclude_none=True) for k, v in sites.items()}


class SitePrivacy(_Record):
    """A site's privacy spend as last reported (its own ledger is the authority)."""

    epsilon: float | None = None
    delta: float | None = None
    steps: int | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    rounds_trained: int = 0
    refusals: int = 0
    local_epsilon: float | None = None  # distributed DP: epsilon of the site's own noise share alone (its local floor)


class PrivacySummary(_Record):
    """The run's privacy section: policy and the worst site's epsilon."""

    enabled: bool = False
    accountant: str | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    max_epsilon: float | None = None
    sites: dict[str, SitePrivacy] = {}
    mode: Literal["local", "distributed"] = "local"
    min_sites: int | None = None  # distributed: every unmasked sum held at least this many sites' shares
    colluders: int | None = None  # distributed: colluding sites the guarantee allows for
    max_local_epsilon: float | None = None  # distributed: the worst site's local floor


class CompressionSummary(_Record):
    """The uplink codec and the measured compression ratio."""

    codec: str = "none"
    topk_fraction: float | None = None
    quantize: str | None = None
    error_feedback: bool = False
    downlink: str = "none"
    ratio_up: float | None = None


class WatermarkSummary(_Record):
    """Detection on the final model, and the commitment a verifier checks the key against."""

    p_value: float
    matches: int
    n: int
    num_classes: int
    detected: bool
    alpha: float
    commitment: str
    embed_seconds: float


class ScalingSummary(_Record):
    """scaling: federated: the statistics the sites computed together before round 1, and how they were released."""

    columns: list[str] = []
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    mean_noise_std: dict[str, float] = {}  # noise std of each pooled mean (0: exact)
    sites: int = 0  # sites whose statistics were pooled
    num_examples: int = 0
    dp: bool = False
    max_epsilon: float | None = None  # the highest training-ledger epsilon a site reported after the release
    outcomes: dict[str, str] = {}  # site -> answered / refused: ... / rejected: ... / timed_out


class DeliveryModel(_Record):
    """One model of the distillation comparison, measured on the coordinator's test set and this machine's CPU."""

    model: str  # teacher | student | student INT8 (mode)
    precision: str = "fp32"
    parameters: int = 0
    bytes: int = 0  # the weights as saved (torch.save of the state dict)
    accuracy: float | None = None
    latency_ms_batch1: float | None = None
    latency_ms_batch256: float | None = None


class DistillationSummary(_Record):
    """distill: which run taught this one, with which loss, and how teacher, student and INT8 student compare."""

    teacher_run: str
    teacher_model: str  # e.g. "cnn width 16", "mlp hidden [64]"
    teacher_parameters: int = 0
    temperature: float = 3.0
    alpha: float = 0.5
    models: list[DeliveryModel] = []  # empty without a central test set


class SelectionSummary(_Record):
    """Which round model.pt holds and why (model_last.pt is the last round)."""

    metric: str = "last"
    round: int = 0
    value: float | None = None
    central: Metrics = {}  # the chosen round's metrics from its source (central: optimistic, chosen on this same test set)
    reason: str = ""
    early_stopped_after: int | None = None


class BaselineCheck(_Record):
    """The kept model against a trivial predictor on the central test set: the majority class (classification)
    or the test targets' mean (regression: R^2 <= 0 does no better)."""

    majority_class: str | None = None
    majority_accuracy: float | None = None
    recall: dict[str, float] = {}  # per class
    mean_rmse: float | None = None  # regression: RMSE of predicting the test mean for everyone
    warning: str | None = None


class RunSummary(_Record):
    """summary.json: the run's outcome, written once at the end."""

    schema_version: int = SCHEMA_VERSION
    name: str
    run_id: str = ""
    rounds: int
    rounds_completed: int
    status: RunStatusName = "completed"  # `fedseek simulate` / `run` exit non-zero unless completed
    num_sites: int
    strategy: str
    dataset: str = ""
    seed: int
    initial: Metrics | None = None
    final: Metrics = {}
    final_accuracy: float | None = None
    privacy: PrivacySummary = PrivacySummary()
    bytes_up: int = 0
    wire_bytes_up: int = 0
    dense_bytes_up: int = 0
    bytes_down: int = 0
    compression: CompressionSummary = CompressionSummary()
    sparsity: float = 0.0
    rejected_updates: int = 0
    rejections: list[RoundRejection] = []
    refused_rounds: int = 0
    failed_replies: int = 0
    excluded_sites: dict[str, str] = {}
    watermark: WatermarkSummary | None = None
    federated_evaluation: FederatedEvalSummary | None = None  # None: federated evaluation was off
    stop_reason: str | None = None  # one line: why the run stopped early or failed (None when completed)
    wall_seconds: float = 0.0
    selection: SelectionSummary | None = None  # None: written by an older fedseek
    baseline: BaselineCheck | None = None  # None: no central test set
    warnings: list[str] = []  # what the operator should look at although the run completed
    scaling: ScalingSummary | None = None  # scaling: federated only
    distillation: DistillationSummary | None = None  # distill: only


def _check_version(data: Any, where: str) -> None:
    version = data.get("schema_version", SCHEMA_VERSION) if isinstance(data, dict) else SCHEMA_VERSION
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema_version {version!r} is newer than this fedseek reads ({SCHEMA_VERSION}); upgrade fedseek")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"


def parse_row(data: Any, where: str = "metrics row") -> MetricsRow:
    """A metrics.jsonl row from parsed JSON; SchemaError naming the field otherwise."""
    _check_version(data, where)
    try:
        return MetricsRow.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(f"{where}: {_first_error(exc)}") from None


def read_rows(path: str | Path) -> list[MetricsRow]:
    """Every complete round in metrics.jsonl (a trailing partial line, from a crash mid-write, is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p}: unreadable ({exc})") from None
    for i, line in enumerate(lines):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise SchemaError(f"{p}:{i + 1}: not a JSON line") from None
        rows.append(parse_row(data, f"{p}:{i + 1}"))
    return rows


def read_summary(path: str | Path) -> RunSummary:
    """summary.json as a RunSummary; SchemaError with the file and field when it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{p}: unreadable ({exc})") from None
    _check_version(data, str(p))
    try:
        return RunSummary.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(f"{p}: {_first_error(exc)}") from None


def dump(record: BaseModel) -> dict[str, Any]:
    """The JSON object a record is written as (aliases for the hyphenated per-site keys)."""
    return record.model_dump(mode="json", by_alias=True)
