"""In-memory dataset container shared by built-in tasks, site loaders and partitioners."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedseek.wire.data_schema import DataSchema, schema_of


class DataError(ValueError):
    """A problem with a site's data file, reported as one clear line (path + what is wrong)."""

    def __init__(self, message: str) -> None:
        """Collapse the message to a single line so logs and CLI output stay one line per error."""
        super().__init__(" ".join(str(message).split()))


@dataclass
class ArrayDataset:
    """Features + labels held as NumPy arrays; the one format every fedseek model trains on.

    Classification: `y` holds class indices 0..num_classes-1. Regression (`task`): `y` holds the
    float target, `num_classes` is 1 (the model's one output), and `target_scale` (mean, std), when
    set, says the target was standardised with those federation-wide statistics (the model
    predicts in those units; predictions are mapped back with them).

    `groups` (optional, one int per row) carries a natural grouping such as the bank a
    transaction came from; `classes` (optional) names label k as `classes[k]`. Both travel
    through `subset`.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = ""
    groups: np.ndarray | None = field(default=None, repr=False)
    classes: list[str] | None = None
    features: list[str] | None = None  # feature (column) names in order, when the source has them
    columns: list[str] | None = None  # the source table's columns the features come from (before one-hot encoding)
    task: str = "classification"  # or "regression"
    target_scale: tuple[float, float] | None = None  # regression: (mean, std) the target was standardised with

    def __post_init__(self) -> None:
        """Coerce dtypes (x float32, y int64 or float32 for regression) and check shapes so errors surface at construction."""
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        regression = self.task == "regression"
        self.y = np.asarray(self.y, dtype=np.float32 if regression else np.int64).reshape(-1)
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayDataset {self.name!r}: x has {self.x.shape[0] if self.x.ndim else 0} rows "
                f"but y has {self.y.shape[0]}"
            )
        if self.num_classes < 1:
            raise ValueError(f"ArrayDataset {self.name!r}: num_classes must be >= 1")
        if regression and (self.num_classes != 1 or self.classes is not None):
            raise ValueError(f"ArrayDataset {self.name!r}: a regression target has one output and no classes")
        if not regression and self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(
                f"ArrayDataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"got range [{self.y.min()}, {self.y.max()}]"
            )
        if self.groups is not None:
            self.groups = np.asarray(self.groups).reshape(-1)
            if self.groups.shape[0] != self.y.shape[0]:
                raise ValueError(
                    f"ArrayDataset {self.name!r}: groups has {self.groups.shape[0]} rows, "
                    f"expected {self.y.shape[0]}"
                )
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"ArrayDataset {self.name!r}: {len(self.classes)} class names for "
                    f"{self.num_classes} classes"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch axis), used to build the model."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """Rows `idx` (indices or boolean mask) as a new dataset, keeping groups and class names."""
        idx = np.asarray(idx)
        return replace(
            self,
            x=self.x[idx],
            y=self.y[idx],
            groups=None if self.groups is None else self.groups[idx],
            classes=None if self.classes is None else list(self.classes),
            features=None if self.features is None else list(self.features),
        )

    def schema(self) -> DataSchema:
        """Features (names, order, dtype) and classes, as the coordinator announces and sites check them."""
        return schema_of(self.input_shape, self.num_classes, self.features, self.classes, task=self.task)

    @property
    def regression(self) -> bool:
        """True when the label is a number to predict rather than a class."""
        return self.task == "regression"

    def class_counts(self) -> np.ndarray:
        """Examples per class (length num_classes), for skew reports and class weighting; regression: all rows in one."""
        if self.regression:
            return np.array([len(self.y)], dtype=np.int64)
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)
