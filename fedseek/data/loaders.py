"""A site's own data: CSV/Parquet tables and class-per-folder image sets, with one-line DataErrors.

Everything a site operator can get wrong (path, format, columns, missing values, labels)
raises `DataError` with a single line naming the file and the problem, never a traceback
from pandas or Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.config.preprocess import PreprocessSpec
from fedseek.data.arrays import ArrayDataset, DataError
from fedseek.data.preprocess import check_complete, prepare_features

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (library errors can be multi-line)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _read_table(path: Path) -> Any:  # pandas.DataFrame (imported lazily)
    """Read a .csv/.parquet file into a DataFrame, turning every failure into a DataError."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r} "
            f"(allowed: {', '.join(TABLE_SUFFIXES)})"
        )
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty table (no columns or rows)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt/unreadable file
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise DataError(f"{path}: cannot read as {kind}: {_first_line(exc)}") from None


def class_mapping(
    path: Path, raw: np.ndarray, classes: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..K-1 (sorted natural order, or the given `classes` order)."""
    as_str = np.array([str(v) for v in raw], dtype=object)
    if classes is not None:
        names = [str(c) for c in classes]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"{path}: `classes` must be a non-empty list of distinct names")
        lookup = {c: i for i, c in enumerate(names)}
        unknown = sorted(set(as_str) - set(lookup))
        if unknown:
            raise DataError(
                f"{path}: label values {unknown[:10]} are not among the configured classes {names}"
            )
        return np.array([lookup[s] for s in as_str], dtype=np.int64), names
    try:
        uniq = np.unique(raw)  # natural order: 2 < 10 for numbers, alphabetical for strings
    except TypeError:  # mixed types: fall back to string order
        uniq = np.unique(as_str)
    names = [str(u) for u in uniq]
    if len(set(names)) != len(names):  # e.g. 1 and "1" in one column
        raise DataError(f"{path}: label values are ambiguous as text: {names[:10]}")
    lookup = {c: i for i, c in enumerate(names)}
    return np.array([lookup[s] for s in as_str], dtype=np.int64), names


def _header(path: Path) -> list[str]:
    """The column names as the file has them ([] when unreadable: _read_table then says why)."""
    try:
        if path.suffix.lower() == ".csv":  # read raw: pandas renames a second 'age' to 'age.1'
            import csv

            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                return [str(c) for c in next(csv.reader(f), [])]
        import pyarrow.parquet as pq

        return [str(c) for c in pq.read_schema(path).names]
    except Exception:  # noqa: BLE001 - any failure here is reported by _read_table
        return []


def _refuse_duplicate_columns(path: Path) -> None:
    """Duplicated column names are an error: which of two 'age' columns is the feature would be a guess."""
    from collections import Counter

    dups = sorted(c for c, n in Counter(_header(path)).items() if n > 1)
    if dups:
        raise DataError(f"{path}: duplicated column names {dups} (each column must have its own name)")


def _feature_columns(path: Path, columns: list[str], label_column: str, feature_columns: list[str] | None) -> list[str]:
    """The configured feature columns (or every column but the label), checked against the table."""
    if feature_columns is None:
        feature_columns = [c for c in columns if c != label_column]
    else:
        feature_columns = [str(c) for c in feature_columns]
        missing = [c for c in feature_columns if c not in columns]
        if missing:
            raise DataError(
                f"{path}: feature columns {missing} not found (available: {', '.join(columns)})"
            )
        if label_column in feature_columns:
            raise DataError(f"{path}: label column {label_column!r} is also listed as a feature")
    if not feature_columns:
        raise DataError(f"{path}: no feature columns (only the label column {label_column!r})")
    return feature_columns


def read_table(path: str | Path) -> Any:  # pandas.DataFrame
    """A .csv/.parquet table with its column names as text; DataError (one line) for anything unreadable."""
    path = Path(path)
    if path.is_file():
        _refuse_duplicate_columns(path)
    df = _read_table(path)
    df.columns = [str(c) for c in df.columns]
    return df


def _label_hint(path: Path, columns: list[str]) -> str:
    """A hint when the header looks like another delimiter than the comma fedseek reads."""
    if len(columns) == 1 and any(d in columns[0] for d in (";", "\t", "|")):
        sep = next(d for d in (";", "\t", "|") if d in columns[0])
        return f"; the file looks {'tab' if sep == chr(9) else repr(sep)}-separated: fedseek reads comma-separated CSV"
    return ""


def label_values(path: str | Path, df: Any, label_column: str) -> np.ndarray:
    """The raw label column of a table (DataError naming the file when it is missing, empty or not class-like)."""
    path = Path(path)
    columns = [str(c) for c in df.columns]
    if label_column not in columns:
        raise DataError(
            f"{path}: label column {label_column!r} not found (available: {', '.join(columns)}){_label_hint(path, columns)}"
        )
    raw = df[label_column].to_numpy()
    check_class_labels(path, raw, label_column)
    return np.asarray(raw)


def check_class_labels(path: Path, raw: np.ndarray, label_column: str) -> None:
    """Refuse a continuous label: a float column with non-integer values is not a set of classes."""
    if raw.dtype.kind != "f":
        return
    finite = raw[np.isfinite(raw)]
    if finite.size and not np.all(finite == np.round(finite)):
        n = int(np.unique(finite).size)
        raise DataError(
            f"{path}: label column {label_column!r} holds non-integer numbers ({n} distinct values): it is a continuous "
            f"target, not classes; set task: regression to predict it as a number"
        )


def regression_target(path: str | Path, df: Any, label_column: str, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A regression label column as float64 (DataError naming the file for a missing column or non-numeric values),
    standardised when the preprocessing gives the label column's mean and std (scaling: given or federated)."""
    import pandas as pd

    path = Path(path)
    columns = [str(c) for c in df.columns]
    if label_column not in columns:
        raise DataError(
            f"{path}: label column {label_column!r} not found (available: {', '.join(columns)}){_label_hint(path, columns)}"
        )
    col = df[label_column]
    if pd.api.types.is_bool_dtype(col):
        raise DataError(f"{path}: label column {label_column!r} is boolean: a regression target must be a number "
                        "(use task: classification for yes/no labels)")
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    text = col.notna().to_numpy() & np.isnan(values)
    if text.any():
        shown = sorted({str(v) for v in col[text].head(50)})[:5]
        raise DataError(f"{path}: label column {label_column!r} has {int(text.sum())} non-numeric values (e.g. {shown}): "
                        "task: regression needs a number in every row")
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise DataError(f"{path}: label column {label_column!r} has {bad} missing or infinite values (a target cannot be filled)")
    if label_column in spec.mean:
        mean, std = float(spec.mean[label_column]), float(spec.std[label_column])
        return (values - mean) / std, (mean, std)
    return values, None


def table_dataset(
    path: str | Path,
    df: Any,
    label_column: str,
    feature_columns: list[str] | None = None,
    standardize: bool = True,
    classes: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    preprocessing: PreprocessSpec | None = None,
    task: str = "classification",
) -> ArrayDataset:
    """Rows of a table already read (`df`, from `path`) as an ArrayDataset; see `load_table`. `exclude`: columns never features.

    `preprocessing` (categorical vocabularies, fill values, scaling) replaces `standardize` when given.
    """
    path = Path(path)
    spec = preprocessing if preprocessing is not None else PreprocessSpec(scaling="local" if standardize else "none")
    columns = [str(c) for c in df.columns]
    if task == "regression":
        if classes is not None:
            raise DataError(f"{path}: classes apply to classification; task: regression predicts a number")
        target, scale = regression_target(path, df, label_column, spec)
        if len(df) == 0:
            raise DataError(f"{path}: empty table (no rows)")
        feature_columns = _feature_columns(path, columns, label_column,
                                           feature_columns or [c for c in columns if c != label_column and c not in exclude])
        x, names = prepare_features(path, df, feature_columns, spec)
        return ArrayDataset(x.astype(np.float32), target, 1, name=path.stem, features=names, columns=list(feature_columns),
                            task="regression", target_scale=scale)
    raw = label_values(path, df, label_column)
    if len(df) == 0:
        raise DataError(f"{path}: empty table (no rows)")
    if feature_columns is None:
        feature_columns = [c for c in columns if c != label_column and c not in exclude]
    feature_columns = _feature_columns(path, columns, label_column, feature_columns)
    check_complete(path, df, [label_column, *(c for c in feature_columns if c not in spec.categorical and c not in spec.fill)])
    x, names = prepare_features(path, df, feature_columns, spec)
    y, class_names = class_mapping(path, raw, classes)
    if classes is None and len(class_names) < 2:
        raise DataError(
            f"{path}: label column {label_column!r} has a single class {class_names[0]!r}; "
            f"need at least 2 (or configure the federation's classes)"
        )
    return ArrayDataset(x.astype(np.float32), y, len(class_names), name=path.stem, classes=class_names, features=names,
                        columns=list(feature_columns))


def load_table(
    path: str | Path,
    label_column: str,
    feature_columns: list[str] | None = None,
    standardize: bool = True,
    classes: Sequence[str] | None = None,
    preprocessing: PreprocessSpec | None = None,
    task: str = "classification",
) -> ArrayDataset:
    """A site's .csv/.parquet table as an ArrayDataset (features float32, labels 0..K-1; regression: the float target).

    - Labels: mapped to 0..K-1 in sorted order of their values, kept as `ArrayDataset.classes`.
      Pass `classes` (from the site/federation config) to fix the mapping: every site must
      map labels identically, which sorted order cannot guarantee when a site lacks a class.
      Without `classes`, a single-class table is an error (the mapping would be meaningless).
      A float label with non-integer values is refused (a continuous target is not classes).
    - `task: regression`: the label is a number per row (missing or text values refused), scaled
      by the label column's mean/std when the preprocessing gives them.
    - Features: `feature_columns`, or every column except the label. Boolean columns become
      0/1. Non-numeric columns are rejected unless `preprocessing.categorical` declares their
      vocabulary: local one-hot encoding would give each site a different feature layout
      depending on which categories it has seen, which silently breaks a federated model.
    - Missing or infinite values: rejected, naming each column and its count (never dropped),
      unless `preprocessing.fill` declares a constant for that column.
    - `standardize`: scale each feature by this table's own mean/std (local statistics;
      constant columns are left centred). Use False when the federation agrees on shared
      public statistics and the table is already scaled.
    - `preprocessing` (fedseek.config.preprocess): declared categorical vocabularies (one-hot),
      fill values for missing numbers and scaling (local / given statistics / none); replaces
      `standardize` when given.
    """
    return table_dataset(path, read_table(path), label_column, feature_columns, standardize, classes, preprocessing=preprocessing,
                         task=task)


def load_image_folder(
    path: str | Path,
    image_size: int,
    grayscale: bool = True,
    classes: Sequence[str] | None = None,
) -> ArrayDataset:
    """Images laid out as root/CLASS/*.png|jpg|jpeg, resized to image_size², scaled to [0, 1], (N, C, H, W).

    Classes are the subfolder names in sorted order (or the given `classes`, which fixes the
    label mapping across sites; a configured class may have no folder or no images here).
    C is 1 for grayscale, else 3 (RGB). Files with other suffixes are ignored.
    """
    from PIL import Image

    root = Path(path)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not root.exists():
        raise DataError(f"{root}: image folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected root/CLASS/*.png)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        if not folders:
            raise DataError(f"{root}: no class folders (expected root/CLASS/*.png|jpg)")
        names = folders
    else:
        names = [str(c) for c in classes]
        extra = sorted(set(folders) - set(names))
        if extra:
            raise DataError(f"{root}: class folders {extra} are not among the configured classes {names}")

    mode = "L" if grayscale else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for f in files:
            try:
                with Image.open(f) as img:
                    small = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                    arr = np.asarray(small, dtype=np.float32) / 255.0
            except Exception as exc:  # noqa: BLE001 - any decode failure names the file
                raise DataError(f"{f}: unreadable image: {_first_line(exc)}") from None
            images.append(arr[None, :, :] if grayscale else arr.transpose(2, 0, 1))
            labels.append(k)
    if not images:
        raise DataError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders {names}"
        )
    x = np.stack(images).astype(np.float32)
    return ArrayDataset(x, np.array(labels, dtype=np.int64), len(names), name=root.name, classes=names)
