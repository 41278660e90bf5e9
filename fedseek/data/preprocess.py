"""Apply a declared preprocessing (fedseek.config.preprocess.PreprocessSpec) to a table's feature columns.

One function, `prepare_features`, used by the site loader, the simulation's tables and `fedseek
predict`, so a row becomes the same feature vector wherever it is read. Every problem is a
DataError of one line naming the file, the column and the count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedseek.config.preprocess import PreprocessSpec
from fedseek.data.arrays import ArrayDataset, DataError


def _one_hot(path: Path, df: Any, col: str, vocab: list[str]) -> tuple[np.ndarray, list[str]]:
    """Columns `col=value` for each value of the vocabulary; an unknown or missing value is refused with its count."""
    raw = df[col]
    missing = int(raw.isna().sum())
    if missing:
        raise DataError(f"{path}: missing values in categorical column {col!r} ({missing}); add a value for them to its vocabulary "
                        "and write it in the file")
    values = raw.astype(str).to_numpy()
    lookup = {str(v): i for i, v in enumerate(vocab)}
    unknown = [v for v in values if v not in lookup]
    if unknown:
        shown = sorted(set(unknown))[:5]
        raise DataError(f"{path}: column {col!r} has {len(unknown)} values outside its declared vocabulary {list(vocab)} "
                        f"(e.g. {shown}); every site must use the same vocabulary")
    out = np.zeros((len(values), len(vocab)), dtype=np.float64)
    out[np.arange(len(values)), [lookup[v] for v in values]] = 1.0
    return out, [f"{col}={v}" for v in vocab]


def _numeric(path: Path, df: Any, col: str, fill: float | None) -> np.ndarray:
    series = df[col] if fill is None else df[col].fillna(fill)
    x = series.to_numpy(dtype=np.float64)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise DataError(f"{path}: infinite values in columns: {col} ({bad})")
    return x


def check_complete(path: Path, df: Any, columns: list[str]) -> None:
    """Refuse missing values in `columns`, naming every such column with its count."""
    counts = df[columns].isna().sum() if columns else []
    with_na = [f"{c} ({int(n)})" for c, n in zip(columns, counts, strict=True) if n > 0]
    if with_na:
        raise DataError(f"{path}: missing values in columns: {', '.join(with_na)} (declare preprocessing.fill for a numeric "
                        "column, or clean the file)")


def check_numeric(path: Path, df: Any, columns: list[str]) -> None:
    """Refuse text columns that are not declared categorical, naming all of them."""
    import pandas as pd

    bad = [c for c in columns if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    if bad:
        raise DataError(f"{path}: non-numeric feature columns {bad} (declare their vocabularies in preprocessing.categorical: "
                        "one-hot, the same at every site; or leave them out)")


def scale_local(x: np.ndarray) -> np.ndarray:
    """Each column scaled by its own mean and std (a constant column is only centred): what `scaling: local` does."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    std[std < 1e-12] = 1.0
    return (x - x.mean(axis=0)) / std


def _scale(path: Path, x: np.ndarray, names: list[str], numeric: list[bool], spec: PreprocessSpec) -> np.ndarray:
    if spec.scaling in ("none", "federated") or x.shape[0] == 0:  # federated: raw until the federation's statistics arrive
        return x
    if spec.scaling == "local":
        return scale_local(x)
    lacking = [n for n, num in zip(names, numeric, strict=True) if num and n not in spec.mean]
    if lacking:
        raise DataError(f"{path}: scaling: given has no mean/std for features {lacking}")
    return apply_scaling(x, [n if num else "" for n, num in zip(names, numeric, strict=True)], spec.mean, spec.std)


def prepare_features(path: str | Path, df: Any, columns: list[str], spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """The table's `columns` (raw, in order) as the model's feature matrix (float64) and the feature names.

    A categorical column becomes one 0/1 column per vocabulary value (`col=value`), in place; a
    numeric column gets its declared fill for missing values (else missing values are refused);
    then the whole matrix is scaled as the spec says.
    """
    path = Path(path)
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise DataError(f"{path}: feature columns {absent} not found (expected, in this order: {', '.join(columns)})")
    check_complete(path, df, [c for c in columns if c not in spec.categorical and c not in spec.fill])
    check_numeric(path, df, [c for c in columns if c not in spec.categorical])
    blocks: list[np.ndarray] = []
    names: list[str] = []
    numeric: list[bool] = []
    for col in columns:
        if col in spec.categorical:
            block, block_names = _one_hot(path, df, col, [str(v) for v in spec.categorical[col]])
            blocks.append(block)
            names += block_names
            numeric += [False] * len(block_names)
        else:
            blocks.append(_numeric(path, df, col, spec.fill.get(col))[:, None])
            names.append(col)
            numeric.append(True)
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(df), 0))
    return _scale(path, x, names, numeric, spec), names


def numeric_features(names: list[str], spec: PreprocessSpec) -> list[str]:
    """The feature names that are numeric columns (not one-hot `col=value` columns of a declared categorical)."""
    onehot = {f"{col}={v}" for col, vocab in spec.categorical.items() for v in vocab}
    return [n for n in names if n not in onehot]


def apply_scaling(x: np.ndarray, names: list[str], mean: dict[str, float], std: dict[str, float]) -> np.ndarray:
    """x with each named feature that has statistics scaled to (value - mean) / std (others unchanged); a new array
    of x's float type (float32 at least)."""
    out = np.array(x, dtype=np.result_type(np.asarray(x).dtype, np.float32), copy=True)
    for j, name in enumerate(names):
        if name in mean:
            out[:, j] = (out[:, j] - mean[name]) / std[name]
    return out


def check_bounds(spec: PreprocessSpec, train: ArrayDataset, label_column: str, *, private: bool) -> None:
    """scaling: federated: bounds name only numeric columns (or a regression's label), and under DP cover all of them."""
    if spec.scaling != "federated":
        return
    columns = numeric_features(list(train.features or []), spec) + ([label_column] if train.regression else [])
    unknown = sorted(set(spec.bounds) - set(columns))
    if unknown:
        raise DataError(f"preprocessing.bounds: {unknown} are not numeric feature columns{' or the label' if train.regression else ''} "
                        f"(allowed: {', '.join(columns)})")
    lacking = [c for c in columns if c not in spec.bounds]
    if private and lacking:
        raise DataError(f"preprocessing.bounds: scaling: federated under DP needs public [low, high] bounds for every numeric column "
                        f"(they bound one record's influence on the statistics); missing for {lacking}")
