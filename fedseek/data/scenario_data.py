"""A simulation scenario's data: its sites' training rows and the coordinator's central test set.

Built-in datasets are split by the scenario's partitioner. Own tables (CSV/Parquet) are read
with the site daemon's loader (fedseek.data.loaders: same checks, same one-line DataErrors):
one file per site, one file split by a site column, or one file split by the partitioner. Every
site scales its features by its own statistics, as a deployed site does; the class order is
the configured `classes` or every label value seen in the scenario's tables, sorted, so every
virtual site maps labels identically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseek.data.arrays import ArrayDataset, DataError
from fedseek.data.builtin import stratified_split
from fedseek.data.loaders import class_mapping, label_values, read_table, table_dataset
from fedseek.data.preprocess import check_bounds, scale_local

if TYPE_CHECKING:
    from fedseek.config import ScenarioConfig


@dataclass
class ScenarioData:
    """The training rows of every virtual site (`parts` index `train`) and the central test set (None: none)."""

    train: ArrayDataset
    parts: list[np.ndarray]
    test: ArrayDataset | None
    name: str


def site_values(table: str, site_column: str) -> list[str]:
    """The distinct values of `site_column` in `table`, sorted: one virtual site each (DataError when unusable)."""
    df = read_table(table)
    if site_column not in df.columns:
        raise DataError(f"{table}: site column {site_column!r} not found (available: {', '.join(map(str, df.columns))})")
    col = df[site_column]
    if col.isna().any():
        raise DataError(f"{table}: site column {site_column!r} has {int(col.isna().sum())} empty values")
    return sorted({str(v) for v in col.to_numpy()})


def _classes(cfg: ScenarioConfig, frames: list[tuple[str, Any]]) -> list[str] | None:
    """The configured classes, else every label value in the scenario's tables (natural sort order); None for regression."""
    d = cfg.data
    if d.task == "regression":
        return None
    if d.classes is not None:
        return [str(c) for c in d.classes]
    raw = np.concatenate([label_values(path, df, d.label_column) for path, df in frames])
    _, names = class_mapping(Path(frames[0][0]), raw, None)
    if len(names) < 2:
        raise DataError(f"{frames[0][0]}: label column {d.label_column!r} has a single class {names[0]!r} in every table; "
                        "need at least 2")
    return names


def _stack(sites: list[ArrayDataset], name: str) -> tuple[ArrayDataset, list[np.ndarray]]:
    """One dataset holding every site's rows in site order, and each site's row indices."""
    features = sites[0].features
    for ds in sites[1:]:
        if ds.features != features:
            raise DataError(f"{ds.name}: feature columns {ds.features} differ from {sites[0].name}'s {features} "
                            "(every site needs the same columns; or list feature_columns)")
    sizes = np.cumsum([0, *(len(ds) for ds in sites)])
    train = ArrayDataset(np.concatenate([ds.x for ds in sites]), np.concatenate([ds.y for ds in sites]), sites[0].num_classes,
                         name=name, classes=sites[0].classes, features=features, columns=sites[0].columns,
                         groups=np.concatenate([np.full(len(ds), i) for i, ds in enumerate(sites)]),
                         task=sites[0].task, target_scale=sites[0].target_scale)
    return train, [np.arange(sizes[i], sizes[i + 1], dtype=np.int64) for i in range(len(sites))]


def _per_site_tables(cfg: ScenarioConfig, classes: list[str] | None, frames: list[tuple[str, Any]]
                     ) -> tuple[ArrayDataset, list[np.ndarray]]:
    d = cfg.data
    sites = [table_dataset(path, df, d.label_column, d.feature_columns, classes=classes, preprocessing=d.preprocess, task=d.task)
             for path, df in frames]
    return _stack(sites, "tables")


def _split_by_column(cfg: ScenarioConfig, classes: list[str] | None, path: str, df: Any) -> tuple[ArrayDataset, list[np.ndarray]]:
    d = cfg.data
    column = str(d.site_column)
    values = site_values(path, column)
    sites = []
    for v in values:
        rows = df[df[column].astype(str) == v]
        ds = table_dataset(path, rows, d.label_column, d.feature_columns, classes=classes, exclude=(column,), preprocessing=d.preprocess,
                           task=d.task)
        ds.name = f"{Path(path).stem}[{column}={v}]"
        sites.append(ds)
    return _stack(sites, Path(path).stem)


def _partitioned(cfg: ScenarioConfig, classes: list[str] | None, path: str, df: Any
                 ) -> tuple[ArrayDataset, list[np.ndarray], ArrayDataset | None]:
    """A lone table: a stratified test split (unless test_table), the rest partitioned; each site then scales its own rows."""
    from fedseek.data.partition import partition_indices

    d = cfg.data
    spec = d.preprocess
    local = spec.scaling == "local"  # then each site (and the test set) scales its own rows, after the split
    whole = table_dataset(path, df, d.label_column, d.feature_columns, classes=classes,
                          preprocessing=spec.model_copy(update={"scaling": "none"}) if local else spec, task=d.task)
    strata = np.zeros(len(whole), dtype=np.int64) if whole.regression else whole.y  # a regression split is a plain random one
    test = None
    if d.test_table is None:
        train_idx, test_idx = stratified_split(len(whole), strata, d.test_fraction, cfg.seed)
        strata = strata[train_idx]
        whole, test = whole.subset(train_idx), whole.subset(test_idx)
        if local:
            test = _scaled(test)
    try:
        parts = partition_indices(strata, cfg.num_sites, cfg.partition.scheme, alpha=cfg.partition.alpha, seed=cfg.seed,
                                  min_partition_size=cfg.partition.min_partition_size)
    except ValueError as exc:
        raise DataError(f"{path}: cannot split {len(whole)} training rows into num_sites {cfg.num_sites} "
                        f"({cfg.partition.scheme}): {exc}") from None
    if local:
        x = whole.x.copy()
        for idx in parts:
            x[idx] = _scaled(whole.subset(idx)).x
        whole = replace(whole, x=x)
    return whole, parts, test


def _scaled(ds: ArrayDataset) -> ArrayDataset:
    """`ds` with each feature scaled by its own mean/std (what a site's loader does with scaling: local)."""
    return replace(ds, x=scale_local(ds.x).astype(np.float32))


def _own_tables(cfg: ScenarioConfig) -> ScenarioData:
    d = cfg.data
    paths = list(d.tables) if d.tables is not None else [str(d.table)]
    frames = [(p, read_table(p)) for p in paths]
    test_frame = (str(d.test_table), read_table(str(d.test_table))) if d.test_table else None
    classes = _classes(cfg, frames + ([test_frame] if test_frame else []))
    test = None
    if d.tables is not None:
        train, parts = _per_site_tables(cfg, classes, frames)
    elif d.site_column is not None:
        train, parts = _split_by_column(cfg, classes, *frames[0])
    else:
        train, parts, test = _partitioned(cfg, classes, *frames[0])
    if test_frame is not None:
        test = table_dataset(test_frame[0], test_frame[1], d.label_column, train.columns, classes=classes, preprocessing=d.preprocess,
                             task=d.task)
        if test.features != train.features:
            raise DataError(f"{test_frame[0]}: features {test.features} differ from the sites' {train.features}")
    return ScenarioData(train, parts, test, Path(paths[0]).stem if len(paths) == 1 else "tables")


def _builtin(cfg: ScenarioConfig) -> ScenarioData:
    from fedseek.data import load_builtin
    from fedseek.data.partition import partition_indices

    train, test = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)
    parts = partition_indices(train.y, cfg.num_sites, cfg.partition.scheme, alpha=cfg.partition.alpha, seed=cfg.seed,
                              min_partition_size=cfg.partition.min_partition_size, groups=getattr(train, "groups", None))
    return ScenarioData(train, parts, test, cfg.data.dataset)


def scenario_data(cfg: ScenarioConfig) -> ScenarioData:
    """Every virtual site's rows and the central test set of a scenario (DataError/ValueError in one line)."""
    return _own_tables(cfg) if cfg.data.own_tables else _builtin(cfg)


def scenario_shapes(cfg: ScenarioConfig) -> tuple[ArrayDataset | None, ArrayDataset]:
    """The coordinator's view: the central test set (None: none) and a dataset with the task's shape, classes and features.

    Built-in data is not partitioned for it (only its test split is loaded).
    """
    if not cfg.data.own_tables:
        from fedseek.data import load_builtin

        test = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)[1]
        return test, test
    data = scenario_data(cfg)
    return data.test, data.train


def check_scenario_data(cfg: ScenarioConfig) -> ScenarioData:
    """Everything about a scenario's own tables that can fail, checked before any process starts (DataError, one line).

    Reads every table, maps the labels, splits the sites, and refuses an empty site or a DP delta
    that is not below 1/n of the largest site (each site refuses delta >= 1/n for its own n: that
    would allow releasing a whole record).
    """
    data = scenario_data(cfg)
    sizes = [len(p) for p in data.parts]
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise DataError(f"num_sites {cfg.num_sites}: {len(empty)} virtual sites would get no rows "
                        f"(only {len(data.train)} training rows); lower num_sites")
    priv = cfg.privacy
    check_bounds(cfg.data.preprocess, data.train, cfg.data.label_column, private=priv is not None and priv.enabled)
    if priv is not None and priv.enabled and priv.delta >= 1.0 / max(sizes):  # binds at the largest site: 1/n is smallest there
        raise DataError(f"privacy.delta {priv.delta} is not below 1/n of the largest site ({max(sizes)} rows), which would refuse "
                        f"every round: use delta < {1.0 / max(sizes):.2g} (a delta of 1/n lets a release expose a whole record)")
    return data
