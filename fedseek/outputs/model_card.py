"""model.json, the model card: how to rebuild the model, what it expects, how it was trained and what it released.

The architecture fields (kind, hidden, input_shape, num_classes) stay at the top level, as
earlier model.json files had them (watermark verification and older readers use them). The
rest says what a user of model.pt needs: the task, the features in order, the class names,
the preprocessing to apply, the training run, the privacy spent and the watermark commitment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

import fedseek
from fedseek.config.preprocess import PreprocessSpec
from fedseek.outputs.schema import RunSummary

CARD_VERSION = 1

Scaling = Literal["local", "given", "federated", "none", "builtin", "unknown"]
SCALING_TEXT: dict[str, str] = {
    "local": "each feature scaled by the mean and standard deviation of the table it comes from (every site scaled its own "
             "rows this way; `fedseek predict` scales the input table the same way)",
    "given": "each numeric feature scaled by the federation's declared mean and std (preprocessing.mean / std)",
    "federated": "each numeric feature scaled by the mean and std the sites computed together before round 1 (under DP a "
                 "noisy, accounted release); the values are below",
    "none": "features used as they are in the table",
    "builtin": "a built-in dataset, scaled by its loader (fedseek.data.builtin); only rows from that loader fit",
    "unknown": "the coordinator did not see the sites' preprocessing (deployment without a test table)",
}


class _Card(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Preprocessing(_Card):
    """What to do to a row before the model sees it (fedseek.data.preprocess.prepare_features applies it)."""

    scaling: Scaling = "unknown"
    description: str = ""
    columns: list[str] | None = None  # the table columns, in order, before one-hot encoding
    categorical: dict[str, list[str]] = {}
    fill: dict[str, float] = {}
    mean: dict[str, float] = {}
    std: dict[str, float] = {}


class TrainingFacts(_Card):
    """Which run produced the weights, and which round they are."""

    name: str = ""
    run_id: str = ""
    data: str = ""
    num_sites: int = 0
    rounds_completed: int = 0
    round: int = 0  # the round model.pt holds
    selection: str = "last"
    average: float | None = None  # strategy.ema_decay: model.pt is this exponential average of the global models up to `round`


class PrivacyFacts(_Card):
    """What the training released about the sites' records."""

    dp: bool = False
    max_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None


class TeacherFacts(_Card):
    """distill: the model this one was distilled from, and the loss (a * CE + (1 - a) * T^2 * KL)."""

    run: str
    model: str  # e.g. "cnn width 16"
    parameters: int = 0
    temperature: float = 3.0
    alpha: float = 0.5
    accuracy: float | None = None  # the teacher on this run's central test set


class ModelCard(_Card):
    """model.json."""

    card_version: int = CARD_VERSION
    kind: str
    hidden: list[int] = [64]
    width: int = 16  # cnn only
    input_shape: list[int]
    num_classes: int
    task: Literal["classification", "regression"] = "classification"
    target_scale: list[float] | None = None  # regression: the model predicts (target - mean) / std; predict maps back
    precision: Literal["fp32", "int8"] = "fp32"  # int8: model_int8.pt (an INT8 state dict) from `fedseek quantize`
    quantization: dict[str, Any] | None = None  # int8: mode, engine, calibration data and its privacy status, sizes
    features: list[str] | None = None
    classes: list[str] | None = None
    preprocessing: Preprocessing = Preprocessing()
    training: TrainingFacts = TrainingFacts()
    privacy: PrivacyFacts = PrivacyFacts()
    watermark_commitment: str | None = None
    parameters: int | None = None
    teacher: TeacherFacts | None = None  # distill: runs only
    fedseek_version: str = fedseek.__version__


class CardError(ValueError):
    """model.json is missing or unreadable (one line)."""


def preprocessing_facts(spec: PreprocessSpec | None, columns: list[str] | None, *, builtin: bool, fitted: Any = None) -> Preprocessing:
    """The card's preprocessing section from the spec the sites applied (None: built-in data, or not known here).

    `fitted` (a FittedScaling) holds the federation's statistics under scaling: federated.
    """
    if spec is None:
        scaling: Scaling = "builtin" if builtin else "unknown"
        return Preprocessing(scaling=scaling, description=SCALING_TEXT[scaling])
    mean, std = (fitted.mean, fitted.std) if fitted is not None else (spec.mean, spec.std)
    return Preprocessing(scaling=spec.scaling,
                         description=SCALING_TEXT[spec.scaling], columns=columns, categorical=spec.categorical, fill=spec.fill,
                         mean=mean, std=std)


def card_spec(card: ModelCard) -> PreprocessSpec:
    """The PreprocessSpec a card describes (what `fedseek predict` applies)."""
    p = card.preprocessing
    scaling = "given" if p.scaling == "federated" else p.scaling  # fitted federated statistics are applied as given ones
    return PreprocessSpec(categorical=p.categorical, fill=p.fill, scaling=scaling, mean=p.mean, std=p.std)


def build_card(meta: dict[str, object], summary: RunSummary, *, features: list[str] | None, classes: list[str] | None,
               preprocessing: Preprocessing, target_scale: tuple[float, float] | None = None, parameters: int | None = None,
               average: float | None = None) -> ModelCard:
    """The card of the model a run keeps (the round summary.selection names)."""
    sel = summary.selection
    priv = summary.privacy
    d = summary.distillation
    teacher = None
    if d is not None:
        acc = next((m.accuracy for m in d.models if m.model == "teacher"), None)
        teacher = {"run": d.teacher_run, "model": d.teacher_model, "parameters": d.teacher_parameters,
                   "temperature": d.temperature, "alpha": d.alpha, "accuracy": acc}
    return ModelCard.model_validate({
        **meta, "features": features, "classes": classes, "preprocessing": preprocessing.model_dump(),
        "target_scale": list(target_scale) if target_scale is not None else None,
        "training": {"name": summary.name, "run_id": summary.run_id, "data": summary.dataset, "num_sites": summary.num_sites,
                     "rounds_completed": summary.rounds_completed, "round": sel.round if sel else summary.rounds_completed,
                     "selection": sel.metric if sel else "last", "average": average},
        "privacy": {"dp": priv.enabled, "max_epsilon": priv.max_epsilon, "delta": priv.delta, "accountant": priv.accountant},
        "watermark_commitment": summary.watermark.commitment if summary.watermark else None,
        "parameters": parameters, "teacher": teacher,
    })


def read_card(path: str | Path) -> ModelCard:
    """model.json as a ModelCard; CardError naming the file when it is missing or not a card."""
    p = Path(path)
    try:
        return ModelCard.model_validate(json.loads(p.read_text()))
    except FileNotFoundError:
        raise CardError(f"{p}: not found (a run directory holds model.pt and model.json)") from None
    except (OSError, ValueError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        what = f"field {'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc).splitlines()[0]
        raise CardError(f"{p}: not a model card ({what})") from None
