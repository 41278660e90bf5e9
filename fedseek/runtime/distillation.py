"""Federated knowledge distillation on the wire: what every TRAIN message says about it, and where the teacher's weights travel.

The teacher is loaded and checked by fedseek.serving.teacher; the sites train on it in fedseek.runtime.site.
"""

from __future__ import annotations

from fedseek.config.federation import DistillSpec
from fedseek.serving.teacher import Teacher
from fedseek.wire.records import DistillMeta

TEACHER_RECORD = "teacher"  # the ArrayRecord beside the model in every TRAIN message of a distillation run


def distill_meta(spec: DistillSpec, teacher: Teacher) -> DistillMeta:
    """What every TRAIN message says about the distillation (the teacher's weights travel beside it)."""
    return DistillMeta(teacher=teacher.meta, temperature=spec.temperature, alpha=spec.alpha)
