"""The data schema the coordinator announces and every site checks before it trains or evaluates.

A model only means something when every site feeds it the same features in the same order and
maps labels to the same class indices. The coordinator knows the expected schema from its test
table or its task config and sends it with every TRAIN/EVALUATE message; a site whose own table
differs refuses with one line saying exactly what differs (no training, no privacy spend).
Feature and class names are compared only where both sides know them; shape and class count always.
Column names and shapes (from the table's header) are public; a refusal never names the site's
label values or their count, which come from its records.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_NAMES = 100_000  # features or classes one schema may list (bounds what a coordinator can make a site parse)


class DataSchema(BaseModel):
    """Features (names, order, dtype) and classes a site's data must have."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_shape: list[int] = Field(min_length=1, max_length=8)
    num_classes: int = Field(ge=1, le=MAX_NAMES)
    features: list[str] | None = Field(None, max_length=MAX_NAMES)  # column names in order (tables); None: unknown
    classes: list[str] | None = Field(None, max_length=MAX_NAMES)  # label k is classes[k]; None: unknown
    dtype: str = "float32"  # what every fedseek loader produces
    task: str = Field("classification", pattern="^(classification|regression)$")


def schema_of(input_shape: tuple[int, ...], num_classes: int, features: list[str] | None, classes: list[str] | None,
              task: str = "classification") -> DataSchema:
    """The schema of a dataset (a site's table, the coordinator's test set)."""
    return DataSchema(input_shape=[int(d) for d in input_shape], num_classes=int(num_classes),
                      features=list(features) if features is not None else None, classes=list(classes) if classes is not None else None,
                      task=task)


def _names(values: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _feature_problem(expected: list[str], actual: list[str]) -> str | None:
    missing = [c for c in expected if c not in actual]
    extra = [c for c in actual if c not in expected]
    if missing or extra:
        parts = ([f"missing columns {_names(missing)}"] if missing else []) + ([f"unexpected columns {_names(extra)}"] if extra else [])
        return "; ".join(parts)
    if expected != actual:
        i = next(k for k, (a, b) in enumerate(zip(expected, actual, strict=True)) if a != b)
        return f"same columns in a different order: position {i + 1} is {actual[i]!r}, expected {expected[i]!r}"
    return None


def _class_problem(expected: list[str]) -> str:
    """The public line for a class mismatch: it names the coordinator's classes, never the site's labels.

    A site's label values (and, unless configured, how many there are) come from its records, so
    they are neither DP-accounted nor public: they stay in the site's own log (site_runtime).
    """
    return (f"this site's labels do not map to the coordinator's classes {_names(expected, 10)} "
            f"(set data.classes to the coordinator's list)")


def schema_mismatch(expected: DataSchema, actual: DataSchema) -> str | None:
    """One line saying what differs between the coordinator's schema and a site's (None: they agree)."""
    if expected.task != actual.task:
        return f"task {actual.task}, expected {expected.task} (set data.task to {expected.task!r})"
    if expected.features is not None and actual.features is not None:
        problem = _feature_problem(expected.features, actual.features)
        if problem:
            return problem
    if expected.input_shape != actual.input_shape:
        return f"input shape {actual.input_shape}, expected {expected.input_shape}"
    if (expected.classes is not None and actual.classes is not None and expected.classes != actual.classes) \
            or expected.num_classes != actual.num_classes:
        return _class_problem(expected.classes) if expected.classes is not None else (
            f"this site's labels do not map to the coordinator's {expected.num_classes} classes "
            f"(set data.classes to the coordinator's list)")
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    return None
