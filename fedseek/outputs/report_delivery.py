"""The report's distillation section: the teacher, the loss, and teacher / student / INT8 student side by side."""

from __future__ import annotations

from dataclasses import dataclass

from fedseek.outputs.report_data import RunData
from fedseek.outputs.report_format import Table, fmt, fmt_bytes


@dataclass(frozen=True)
class DeliverySection:
    """distill: the teacher, the loss, and teacher / student / INT8 student side by side."""

    notes: list[str]
    table: Table | None


def delivery_section(data: RunData) -> DeliverySection | None:
    """The distillation comparison from summary.json (measured by the coordinator on its test set and CPU)."""
    d = data.summary.distillation if data.summary is not None else None
    if d is None:
        return None
    notes = [(f"Student of {d.teacher_run} ({d.teacher_model}, {d.teacher_parameters:,} parameters), trained by every site on its own "
             f"records with loss {d.alpha:g} x cross-entropy + {1 - d.alpha:g} x T² x KL(teacher || student) at T = {d.temperature:g}; "
             "the teacher's answers on a site's records never leave it, and under DP the rounds are charged like any training round."),
             ("Accuracy on the coordinator's test set; bytes of the saved weights; median CPU latency of one forward pass on the "
             "machine that ran the coordinator. The INT8 row is the student quantized the way `fedseek quantize` does it.")]
    if not d.models:
        return DeliverySection(notes + ["No central test set: nothing was measured."], None)
    rows = [[m.model, m.precision, f"{m.parameters:,}", fmt_bytes(m.bytes), fmt(m.accuracy), fmt(m.latency_ms_batch1, 3),
             fmt(m.latency_ms_batch256, 3)] for m in d.models]
    return DeliverySection(notes, Table(["model", "precision", "parameters", "weights", "accuracy", "ms (batch 1)", "ms (batch 256)"],
                                        rows, "delivery"))
