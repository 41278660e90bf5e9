"""Tests for fedseek.data: containers, built-in tasks, site loaders and partitioners (fast, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedseek.data import (
    BANK_FRAUD_FEATURES,
    ArrayDataset,
    DataError,
    bank_fraud,
    breast_cancer,
    digits,
    load_builtin,
    load_image_folder,
    load_table,
    partition_indices,
)
from fedseek.names import DATASETS, PARTITION_SCHEMES

if TYPE_CHECKING:
    import pandas as pd


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """Message of a raised DataError/ValueError: one line, containing every needle."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- ArrayDataset


def test_array_dataset_coerces_dtypes_and_subset_carries_groups() -> None:
    ds = ArrayDataset(
        np.arange(12).reshape(6, 2), [0, 1, 2, 0, 1, 2], 3, "t",  # type: ignore[arg-type]  # a list is coerced: checked here
        groups=np.array([5, 5, 6, 6, 7, 7]), classes=["a", "b", "c"],
    )
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.input_shape == (2,) and len(ds) == 6
    sub = ds.subset(np.array([1, 3, 4]))
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.y, [1, 0, 1])
    np.testing.assert_array_equal(sub.groups, [5, 6, 7])
    assert sub.classes == ["a", "b", "c"] and sub.num_classes == 3
    np.testing.assert_array_equal(sub.class_counts(), [1, 2, 0])
    mask = ds.subset(ds.y == 2)
    np.testing.assert_array_equal(mask.groups, [6, 7])


def test_array_dataset_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="rows"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(4), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ArrayDataset(np.zeros((2, 2)), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="groups"):
        ArrayDataset(np.zeros((2, 2)), np.array([0, 1]), 2, groups=np.zeros(3))


def test_data_error_is_one_line_value_error() -> None:
    err = DataError("x.csv: bad\nthing\n  here")
    assert isinstance(err, ValueError)
    assert str(err) == "x.csv: bad thing here"


# ---------------------------------------------------------------- built-in tasks


def test_breast_cancer_shapes_split_and_standardization() -> None:
    tr, te = breast_cancer(seed=0)
    assert len(tr) + len(te) == 569
    assert abs(len(te) - 0.25 * 569) <= 2
    assert tr.input_shape == (30,) and tr.num_classes == 2
    assert tr.x.dtype == np.float32 and tr.y.dtype == np.int64
    # stratified: class proportions match within one example
    p_tr, p_te = tr.class_counts() / len(tr), te.class_counts() / len(te)
    assert np.all(np.abs(p_tr - p_te) < 0.02)
    # standardized with TRAIN statistics: exact on train, approximate on test
    np.testing.assert_allclose(tr.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(tr.x.std(axis=0), 1.0, atol=1e-3)
    assert np.abs(te.x.mean(axis=0)).max() > 1e-3
    assert tr.classes == ["malignant", "benign"]


def test_builtin_determinism_by_seed() -> None:
    a_tr, a_te = breast_cancer(seed=3)
    b_tr, _ = breast_cancer(seed=3)
    c_tr, _ = breast_cancer(seed=4)
    np.testing.assert_array_equal(a_tr.x, b_tr.x)
    np.testing.assert_array_equal(a_tr.y, b_tr.y)
    assert a_tr.x.shape == c_tr.x.shape and not np.array_equal(a_tr.x, c_tr.x)
    d1, _ = digits(seed=1)
    d2, _ = digits(seed=1)
    np.testing.assert_array_equal(d1.x, d2.x)


def test_digits_images_and_flat() -> None:
    tr, te = digits(seed=0)
    assert len(tr) + len(te) == 1797
    assert tr.x.shape[1:] == (1, 8, 8) and tr.input_shape == (1, 8, 8)
    assert tr.num_classes == 10 and np.all(tr.class_counts() > 100)
    assert tr.x.min() >= 0.0 and tr.x.max() <= 1.0 and tr.x.max() > 0.9
    flat, _ = digits(seed=0, as_images=False)
    assert flat.x.shape == (len(tr), 64)
    np.testing.assert_array_equal(flat.x, tr.x.reshape(len(tr), 64))


def test_load_builtin_dispatch_and_error() -> None:
    tr, _ = load_builtin("digits", seed=0, as_images=False)
    assert tr.input_shape == (64,)
    tr, _ = load_builtin("bank_fraud", seed=0, num_banks=3, rows_per_bank=400)
    assert tr.groups is not None and set(np.unique(tr.groups)) == {0, 1, 2}
    with pytest.raises(ValueError) as ei:
        load_builtin("mnist", seed=0)
    _one_line_error(ei, "mnist", "breast_cancer", "digits", "bank_fraud", *DATASETS)
    small = {"bank_fraud": {"num_banks": 2, "rows_per_bank": 200}}
    for name in DATASETS:  # every name the config accepts has a loader
        tr, te = load_builtin(name, seed=0, **small.get(name, {}))
        assert len(tr) > 0 and len(te) > 0


@pytest.fixture(scope="module")
def fraud() -> tuple[ArrayDataset, ArrayDataset]:
    return bank_fraud(seed=0)


def test_bank_fraud_shapes_rate_and_groups(fraud: tuple[ArrayDataset, ArrayDataset]) -> None:
    tr, te = fraud
    assert len(tr) + len(te) == 10 * 2000
    assert tr.input_shape == (len(BANK_FRAUD_FEATURES),) and tr.num_classes == 2
    assert tr.x.dtype == np.float32 and np.isfinite(tr.x).all()
    all_y = np.concatenate([tr.y, te.y])
    assert 0.01 <= all_y.mean() <= 0.02
    assert tr.groups is not None and te.groups is not None
    assert set(np.unique(tr.groups)) == set(range(10)) == set(np.unique(te.groups))
    # each bank has frauds on both sides of the (bank, label)-stratified split
    for g in range(10):
        assert tr.y[tr.groups == g].sum() > 0 and te.y[te.groups == g].sum() > 0
    np.testing.assert_allclose(tr.x.mean(axis=0), 0.0, atol=1e-4)  # train-standardized
    # groups survive subset
    sub = tr.subset(np.flatnonzero(tr.groups == 4))
    assert np.all(sub.groups == 4)


def test_bank_fraud_per_bank_drift_visible() -> None:
    amount = BANK_FRAUD_FEATURES.index("log_amount")
    foreign = BANK_FRAUD_FEATURES.index("foreign")

    def spread(drift: float, col: int) -> float:
        tr, _ = bank_fraud(seed=1, num_banks=6, rows_per_bank=1500, drift=drift)
        means = [tr.x[tr.groups == g, col].mean() for g in range(6)]
        return float(np.std(means))

    drifted, iid = spread(0.5, amount), spread(0.0, amount)
    assert drifted > 0.1 and drifted > 5 * iid  # std units of bank-mean log amount
    assert spread(0.5, foreign) > 2 * spread(0.0, foreign)


def test_bank_fraud_learnable_not_trivial(fraud: tuple[ArrayDataset, ArrayDataset]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    tr, te = fraud
    model = LogisticRegression(max_iter=1000).fit(tr.x, tr.y)
    auc = roc_auc_score(te.y, model.predict_proba(te.x)[:, 1])
    assert 0.85 < auc < 0.99


def test_bank_fraud_deterministic() -> None:
    a, _ = bank_fraud(seed=5, num_banks=2, rows_per_bank=300)
    b, _ = bank_fraud(seed=5, num_banks=2, rows_per_bank=300)
    c, _ = bank_fraud(seed=6, num_banks=2, rows_per_bank=300)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert not np.array_equal(a.x, c.x)


# ---------------------------------------------------------------- partitioning


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return digits(seed=0)[0].y


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_all_rows_once(labels: np.ndarray, scheme: str) -> None:
    parts = partition_indices(labels, 8, scheme, alpha=0.5, seed=0)
    assert len(parts) == 8
    assert sum(p.size for p in parts) == labels.size
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.size))  # disjoint + complete
    assert all(p.dtype == np.int64 and p.size >= 2 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partitions_seeded(labels: np.ndarray, scheme: str) -> None:
    a = partition_indices(labels, 6, scheme, seed=11)
    b = partition_indices(labels, 6, scheme, seed=11)
    c = partition_indices(labels, 6, scheme, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_partition_results_are_copies(labels: np.ndarray) -> None:
    a = partition_indices(labels, 4, "iid", seed=2)
    first = a[0].copy()
    a[0][:] = -1
    b = partition_indices(labels, 4, "iid", seed=2)
    np.testing.assert_array_equal(b[0], first)


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label distribution and the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / labels.size
    return float(np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / p.size - glob).sum() for p in parts
    ]))


def test_dirichlet_skews_labels_more_than_iid(labels: np.ndarray) -> None:
    iid = _label_skew(labels, partition_indices(labels, 10, "iid", seed=0))
    dir_mild = _label_skew(labels, partition_indices(labels, 10, "dirichlet", alpha=10.0, seed=0))
    dir_strong = _label_skew(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0))
    assert iid < 0.15
    assert dir_strong > 0.5 and dir_strong > 3 * iid
    assert dir_strong > dir_mild


def test_iid_equal_sizes_quantity_unequal(labels: np.ndarray) -> None:
    iid_sizes = [p.size for p in partition_indices(labels, 7, "iid", seed=0)]
    assert max(iid_sizes) - min(iid_sizes) <= 1
    q_sizes = [p.size for p in partition_indices(labels, 7, "quantity", seed=0)]
    assert max(q_sizes) >= 4 * min(q_sizes)
    assert sum(q_sizes) == labels.size


def test_natural_partition_by_groups(fraud: tuple[ArrayDataset, ArrayDataset]) -> None:
    tr, _ = fraud
    assert tr.groups is not None
    parts = partition_indices(tr.y, 4, "natural", groups=tr.groups)
    assert sum(p.size for p in parts) == len(tr)
    for pid, p in enumerate(parts):
        assert set(np.unique(tr.groups[p])) == {g for g in range(10) if g % 4 == pid}
    one_each = partition_indices(tr.y, 10, "natural", groups=tr.groups)
    assert [set(np.unique(tr.groups[p])) for p in one_each] == [{g} for g in range(10)]
    with pytest.raises(ValueError, match="groups"):
        partition_indices(tr.y, 4, "natural")
    with pytest.raises(ValueError, match="min_partition_size"):
        partition_indices(tr.y, 11, "natural", groups=tr.groups)  # bank 10 does not exist


def test_partition_errors(labels: np.ndarray) -> None:
    with pytest.raises(ValueError) as ei:
        partition_indices(labels, 3, "by_zip")
    _one_line_error(ei, "by_zip", *PARTITION_SCHEMES)
    with pytest.raises(ValueError, match="exceeds"):
        partition_indices(labels[:5], 6)
    with pytest.raises(ValueError, match="positive"):
        partition_indices(labels, 0)
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(labels, 3, "dirichlet", alpha=0.0)


# ---------------------------------------------------------------- table loaders


def _frame() -> pd.DataFrame:
    import pandas as pd

    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "age": rng.normal(60, 10, 40),
        "marker": rng.normal(5, 2, 40),
        "smoker": rng.random(40) < 0.3,
        "note": ["x"] * 40,
        "outcome": rng.choice(["recovered", "died", "transferred"], 40),
    })


def test_load_csv_maps_labels_and_standardizes(tmp_path: Path) -> None:
    df = _frame()
    path = tmp_path / "site.csv"
    df.to_csv(path, index=False)
    ds = load_table(path, "outcome", feature_columns=["age", "marker", "smoker"])
    assert ds.classes == ["died", "recovered", "transferred"] and ds.num_classes == 3
    assert ds.input_shape == (3,) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.y, [ds.classes.index(v) for v in df["outcome"]])
    np.testing.assert_allclose(ds.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x.std(axis=0), 1.0, atol=1e-4)
    raw = load_table(path, "outcome", feature_columns=["age"], standardize=False)
    np.testing.assert_allclose(raw.x[:, 0], df["age"].to_numpy(), rtol=1e-6)


def test_load_parquet_numeric_labels_natural_order(tmp_path: Path) -> None:
    df = _frame().drop(columns=["note", "outcome"])
    df["grade"] = [2, 10, 1, 2] * 10  # numeric order 1 < 2 < 10, not text order
    path = tmp_path / "site.parquet"
    df.to_parquet(path)
    ds = load_table(path, "grade")  # all other columns are features
    assert ds.classes == ["1", "2", "10"]
    np.testing.assert_array_equal(ds.y[:4], [1, 2, 0, 1])
    assert ds.input_shape == (3,)


def test_load_table_configured_classes(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "one_class.csv"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": ["benign"] * 3}).to_csv(path, index=False)
    ds = load_table(path, "y", classes=["benign", "malignant"])
    assert ds.num_classes == 2 and ds.y.tolist() == [0, 0, 0]
    with pytest.raises(DataError) as ei:
        load_table(path, "y", classes=["cat", "dog"])
    _one_line_error(ei, "benign", "configured classes")


def test_table_errors_are_one_clear_line(tmp_path: Path) -> None:
    import pandas as pd

    with pytest.raises(DataError) as ei:
        load_table(tmp_path / "nope.csv", "y")
    _one_line_error(ei, "nope.csv", "not found")

    xlsx = tmp_path / "data.xlsx"
    xlsx.write_text("hello")
    with pytest.raises(DataError) as ei:
        load_table(xlsx, "y")
    _one_line_error(ei, "data.xlsx", ".xlsx", ".csv", ".parquet")

    bad_pq = tmp_path / "bad.parquet"
    bad_pq.write_bytes(b"definitely not parquet\n" * 10)
    with pytest.raises(DataError) as ei:
        load_table(bad_pq, "y")
    _one_line_error(ei, "bad.parquet", "cannot read as Parquet")

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,y\n1,0\n2,1,7,8\n")
    with pytest.raises(DataError) as ei:
        load_table(ragged, "y")
    _one_line_error(ei, "ragged.csv", "cannot read as CSV")

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError) as ei:
        load_table(empty, "y")
    _one_line_error(ei, "empty.csv", "empty")

    header_only = tmp_path / "header.csv"
    header_only.write_text("a,y\n")
    with pytest.raises(DataError) as ei:
        load_table(header_only, "y")
    _one_line_error(ei, "header.csv", "empty")

    df = _frame()
    path = tmp_path / "site.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as ei:
        load_table(path, "label")
    _one_line_error(ei, "site.csv", "'label'", "age", "outcome")

    with pytest.raises(DataError) as ei:
        load_table(path, "outcome", feature_columns=["age", "height"])
    _one_line_error(ei, "height", "not found")

    with pytest.raises(DataError) as ei:
        load_table(path, "outcome")  # "note" is text
    _one_line_error(ei, "site.csv", "non-numeric", "note")

    holes = df.drop(columns=["note"]).copy()
    holes.loc[[1, 5, 7], "marker"] = np.nan
    holes.loc[[2], "outcome"] = None
    holes_path = tmp_path / "holes.parquet"
    holes.to_parquet(holes_path)
    with pytest.raises(DataError) as ei:
        load_table(holes_path, "outcome")
    _one_line_error(ei, "holes.parquet", "missing values", "marker (3)", "outcome (1)")

    inf = df.drop(columns=["note"]).copy()
    inf.loc[[0, 3], "age"] = np.inf
    inf_path = tmp_path / "inf.parquet"
    inf.to_parquet(inf_path)
    with pytest.raises(DataError) as ei:
        load_table(inf_path, "outcome")
    _one_line_error(ei, "inf.parquet", "infinite", "age (2)")

    single = tmp_path / "single.csv"
    pd.DataFrame({"a": [1.0, 2.0], "y": [1, 1]}).to_csv(single, index=False)
    with pytest.raises(DataError) as ei:
        load_table(single, "y")
    _one_line_error(ei, "single.csv", "single class")


# ---------------------------------------------------------------- image folders


def _write_images(root: Path, per_class: dict[str, int], size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 == 0 else ".jpg"
            Image.fromarray(arr).save(root / cls / f"img{i}{suffix}")


def test_load_image_folder_gray_and_rgb(tmp_path: Path) -> None:
    _write_images(tmp_path, {"normal": 3, "pneumonia": 2})
    (tmp_path / "normal" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, image_size=8)
    assert ds.x.shape == (5, 1, 8, 8) and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.5
    assert ds.classes == ["normal", "pneumonia"]
    np.testing.assert_array_equal(ds.y, [0, 0, 0, 1, 1])
    rgb = load_image_folder(tmp_path, image_size=6, grayscale=False)
    assert rgb.x.shape == (5, 3, 6, 6)
    fixed = load_image_folder(tmp_path, 4, classes=["covid", "normal", "pneumonia"])
    assert fixed.num_classes == 3 and fixed.class_counts().tolist() == [0, 3, 2]


def test_image_folder_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_image_folder(tmp_path / "missing", 8)
    _one_line_error(ei, "missing", "not found")

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    with pytest.raises(DataError) as ei:
        load_image_folder(flat, 8)
    _one_line_error(ei, "flat", "no class folders")

    no_imgs = tmp_path / "noimgs"
    (no_imgs / "a").mkdir(parents=True)
    with pytest.raises(DataError) as ei:
        load_image_folder(no_imgs, 8)
    _one_line_error(ei, "noimgs", "no images")

    broken = tmp_path / "broken"
    _write_images(broken, {"a": 2})
    (broken / "a" / "zz_corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as ei:
        load_image_folder(broken, 8)
    _one_line_error(ei, "zz_corrupt.png", "unreadable image")
