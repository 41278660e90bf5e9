"""Federated knowledge distillation (`distill:`): the teacher run's model, checked against the student's task, and compared with it.

The teacher is a finished run's kept model (model.pt + model.json). The coordinator checks it
fits the student's task (same inputs, same classes in the same order, a classifier, fp32, and a
student with fewer parameters), sends its weights with every TRAIN message (every site already
holds it: it is a federated model), and compares teacher and student at the end. Each site
computes the teacher's logits on its own records and trains the student on them under its own
DP policy (fedseek.runtime.site); the logits never leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.config.federation import DistillSpec
from fedseek.outputs.model_card import CardError, ModelCard, read_card
from fedseek.wire.records import ModelMeta


class DistillError(ValueError):
    """The teacher cannot teach this run (one line naming the run directory)."""


@dataclass
class Teacher:
    """The teacher model, its card and weights, as the coordinator sends them."""

    run_dir: Path
    card: ModelCard
    meta: ModelMeta
    arrays: dict[str, np.ndarray]
    parameters: int

    def module(self) -> Any:
        """A fresh torch module holding the teacher's weights (eval mode)."""
        return module_from(self.meta, self.arrays)


def parameter_count(meta: ModelMeta) -> int:
    """Trainable parameters of the architecture a ModelMeta describes."""
    from fedseek.train.models import build_model

    model = build_model(meta.kind, tuple(meta.input_shape), int(meta.num_classes), meta.hidden, width=meta.width)
    return int(sum(p.numel() for p in model.parameters()))


def describe(meta: ModelMeta) -> str:
    """The architecture in a few words: `mlp hidden [16]`, `cnn width 16`."""
    return f"cnn width {meta.width}" if meta.kind == "cnn" else f"{meta.kind} hidden {list(meta.hidden)}"


def module_from(meta: ModelMeta, arrays: dict[str, np.ndarray]) -> Any:
    """Build `meta`'s architecture and load `arrays` into it (ValueError when they do not fit)."""
    import torch

    from fedseek.train.models import build_model

    model = build_model(meta.kind, tuple(meta.input_shape), int(meta.num_classes), meta.hidden, width=meta.width)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    if want != got:
        raise ValueError(f"the teacher's weights do not fit its architecture ({len(got)} arrays, {len(want)} expected)")
    if not all(np.all(np.isfinite(v)) for v in arrays.values()):
        raise ValueError("the teacher's weights hold non-finite values")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in arrays.items()})
    model.eval()
    return model


def load_teacher(spec: DistillSpec) -> Teacher:
    """The teacher run's kept model; DistillError when the directory holds no usable fp32 classifier."""
    import torch

    run = Path(spec.teacher)
    where = f"distill.teacher {run}"
    if not run.is_dir():
        raise DistillError(f"{where}: not a directory (give a finished run directory holding model.pt and model.json)")
    try:
        card = read_card(run / "model.json")
    except CardError as exc:
        raise DistillError(f"{where}: {exc}") from None
    if card.precision != "fp32":
        raise DistillError(f"{where}: its model is {card.precision}; distil from the fp32 run it was quantized from")
    if card.task != "classification":
        raise DistillError(f"{where}: its model is a {card.task} model; distillation needs a classifier")
    try:
        state = torch.load(run / "model.pt", weights_only=True)
        arrays = {k: v.detach().cpu().float().numpy() for k, v in state.items()}
    except Exception as exc:  # noqa: BLE001 - a missing or damaged file
        raise DistillError(f"{where}: cannot read model.pt ({str(exc).splitlines()[0][:160]})") from None
    meta = ModelMeta(kind=card.kind, hidden=list(card.hidden), width=card.width, input_shape=list(card.input_shape),
                     num_classes=card.num_classes)
    try:
        module_from(meta, arrays)
    except ValueError as exc:
        raise DistillError(f"{where}: {exc}") from None
    return Teacher(run, card, meta, arrays, parameter_count(meta))


def check_student(teacher: Teacher, student: ModelMeta, *, features: list[str] | None, classes: list[str] | None) -> None:
    """The student must read the same inputs, answer the same classes and be smaller (DistillError otherwise)."""
    where = f"distill.teacher {teacher.run_dir}"
    if list(student.input_shape) != list(teacher.meta.input_shape):
        raise DistillError(f"{where}: the teacher reads inputs of shape {teacher.meta.input_shape}, this run's data has "
                           f"{list(student.input_shape)} (distil on the data the teacher was trained for)")
    if student.num_classes != teacher.meta.num_classes:
        raise DistillError(f"{where}: the teacher answers {teacher.meta.num_classes} classes, this run's task has {student.num_classes}")
    if classes and teacher.card.classes and list(classes) != list(teacher.card.classes):
        raise DistillError(f"{where}: the teacher's classes {teacher.card.classes} differ from this run's {list(classes)}")
    if features and teacher.card.features and list(features) != list(teacher.card.features):
        raise DistillError(f"{where}: the teacher's features differ from this run's (same columns, same order needed)")
    n = parameter_count(student)
    if n >= teacher.parameters:
        raise DistillError(f"model: the student ({describe(student)}) has {n:,} parameters and the teacher ({describe(teacher.meta)}) "
                           f"{teacher.parameters:,}: a student must be smaller than its teacher (a narrower model.hidden or model.width)")


def check_config(spec: DistillSpec, model: Any, input_shape: tuple[int, ...], num_classes: int, *,
                 features: list[str] | None = None, classes: list[str] | None = None) -> Teacher:
    """Before a run starts: the teacher loads and the configured student (a ModelSpec) fits it (DistillError, one line)."""
    teacher = load_teacher(spec)
    student = ModelMeta(kind=model.kind, hidden=list(model.hidden), width=model.width, input_shape=list(input_shape),
                        num_classes=int(num_classes))
    check_student(teacher, student, features=features, classes=classes)
    return teacher


def compare(teacher: Teacher, student: Any, test: Any) -> list[dict[str, Any]]:
    """Teacher, student and the student's INT8 form on the coordinator's test set: accuracy, parameters, bytes, CPU latency."""
    import warnings

    from fedseek.serving.measure import latency_ms, model_bytes
    from fedseek.serving.quantize import quantize_module, traced
    from fedseek.train.local import predict_scores

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (see serving.quantize)
        shape = tuple(int(d) for d in test.x.shape[1:])
        int8, mode, int8_bytes = quantize_module(student, shape)
        int8 = traced(int8, shape)  # as `fedseek predict` / `serve` load it
    for name, model, nbytes, params, precision in (
        ("teacher", teacher.module(), model_bytes(teacher.module()), teacher.parameters, "fp32"),
        ("student", student, model_bytes(student), int(sum(p.numel() for p in student.parameters())), "fp32"),
        (f"student INT8 ({mode})", int8, int8_bytes, int(sum(p.numel() for p in student.parameters())), "int8"),
    ):
        acc = float(np.mean(predict_scores(model, test.x).argmax(1) == test.y)) if len(test.y) else float("nan")
        rows.append({"model": name, "precision": precision, "parameters": params, "bytes": int(nbytes), "accuracy": acc,
                     "latency_ms_batch1": latency_ms(model, test.x, 1), "latency_ms_batch256": latency_ms(model, test.x, 256)})
    return rows
