"""Simulations on your own tables: per-site files, one table split by a site column or by the partitioner.

Fast tier: the scenario schema, the loader (same as a site daemon's), the checks made before any
process starts (one line, exit 2, no output directory left behind). Slow tier: `fedseek simulate`
end to end on per-site CSVs, the model compared with a pooled central logistic regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from fedseek.config import ConfigError, load_scenario
from fedseek.data import DataError
from fedseek.data.scenario_data import check_scenario_data, scenario_data
from fedseek.runtime.task import scenario_task
from tests.conftest import ROOT


def _cancer_frame() -> pd.DataFrame:
    bc = load_breast_cancer()
    df = pd.DataFrame(bc.data[:, :6], columns=[f"f{i}" for i in range(6)])
    df["diagnosis"] = np.where(bc.target == 1, "benign", "malignant")
    return df


def _write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def site_csvs(tmp_path: Path) -> list[Path]:
    """Three centres of very different sizes; the smallest has only benign cases (a single class)."""
    df = _cancer_frame()
    benign = df[df.diagnosis == "benign"]
    parts = [df.iloc[:300], df.iloc[300:540], benign.iloc[-25:]]
    paths = []
    for i, part in enumerate(parts):
        p = tmp_path / "data" / f"centre{i}.csv"
        p.parent.mkdir(exist_ok=True)
        part.to_csv(p, index=False)
        paths.append(p)
    return paths


def test_per_site_tables_share_one_class_order_and_relative_paths(tmp_path, site_csvs):
    scen = _write(tmp_path, "name: own\ndata: {tables: [data/centre0.csv, data/centre1.csv, data/centre2.csv], "
                            "label_column: diagnosis}\n")
    cfg = load_scenario(scen)
    assert cfg.num_sites == 3 and cfg.partition.scheme == "natural"
    assert cfg.data.tables == [str(p.resolve()) for p in site_csvs]
    data = scenario_data(cfg)
    assert data.train.classes == ["benign", "malignant"] and data.test is None
    assert [len(p) for p in data.parts] == [300, 240, 25]
    assert set(data.train.y[data.parts[2]].tolist()) == {0}  # the single-class centre maps benign -> 0 like the others
    assert data.train.features == [f"f{i}" for i in range(6)]
    x0 = data.train.x[data.parts[0]]
    assert np.allclose(x0.mean(axis=0), 0, atol=1e-5) and np.allclose(x0.std(axis=0), 1, atol=1e-3)  # its own statistics
    task = scenario_task(cfg)
    assert task.test is None and task.input_shape == (6,) and task.num_classes == 2
    assert task.schema is not None and task.schema.classes == ["benign", "malignant"]


def test_one_table_split_by_site_column_with_a_test_table(tmp_path):
    df = _cancer_frame()
    df["hospital"] = np.array(["north", "south", "east", "west"])[np.arange(len(df)) % 4]
    df.iloc[:500].to_csv(tmp_path / "all.csv", index=False)
    df.iloc[500:].drop(columns="hospital").to_csv(tmp_path / "test.csv", index=False)
    cfg = load_scenario(_write(tmp_path, "data: {table: all.csv, site_column: hospital, label_column: diagnosis, "
                                         "test_table: test.csv}\n"))
    assert cfg.num_sites == 4
    data = scenario_data(cfg)
    assert sum(len(p) for p in data.parts) == 500 and "hospital" not in (data.train.features or [])
    assert data.test is not None and len(data.test) == len(df) - 500 and data.test.features == data.train.features
    with pytest.raises(ConfigError, match=r"num_sites.*3 differs from the 4 sites in column 'hospital'"):
        load_scenario(_write(tmp_path, "num_sites: 3\ndata: {table: all.csv, site_column: hospital, label_column: diagnosis}\n",
                             "bad.yaml"))


def test_one_table_split_by_the_partitioner_keeps_a_stratified_test_set(tmp_path):
    _cancer_frame().to_csv(tmp_path / "all.csv", index=False)
    cfg = load_scenario(_write(tmp_path, "seed: 3\nnum_sites: 5\ndata: {table: all.csv, label_column: diagnosis, "
                                         "test_fraction: 0.2}\npartition: {scheme: dirichlet, alpha: 0.5}\n"))
    a, b = scenario_data(cfg), scenario_data(cfg)
    assert len(a.parts) == 5 and all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts, strict=True))  # seeded
    assert a.test is not None and abs(len(a.test) - 0.2 * 569) <= 2
    assert sum(len(p) for p in a.parts) + len(a.test) == 569


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("data: {tables: [a.csv], dataset: digits}", "leave them out"),
    ("data: {site_column: h}", "site_column splits `table`"),
    ("data: {test_table: t.csv}", "apply to own tables"),
    ("num_sites: 4\ndata: {tables: [a.csv, b.csv]}", r"num_sites \(4\) differs from the 2 files"),
    ("data: {tables: [a.csv, b.csv]}\npartition: {scheme: iid}", "partition does not apply"),
    ("data: {tables: [a.csv], table: b.csv}", "not both"),
])
def test_scenario_schema_refuses_contradictions(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario(_write(tmp_path, yaml_text + "\n"))


def test_empty_scenario_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="empty scenario"):
        load_scenario(_write(tmp_path, "# nothing\n"))


def test_float_label_and_semicolon_file_get_one_line_errors(tmp_path):
    df = _cancer_frame()
    df["diagnosis"] = np.linspace(0.0, 41.5, len(df))
    df.to_csv(tmp_path / "cont.csv", index=False)
    cfg = load_scenario(_write(tmp_path, "data: {tables: [cont.csv, cont.csv], label_column: diagnosis}\n"))
    with pytest.raises(DataError, match="non-integer numbers .* continuous target"):
        scenario_data(cfg)
    _cancer_frame().to_csv(tmp_path / "semi.csv", index=False, sep=";")
    cfg = load_scenario(_write(tmp_path, "data: {tables: [semi.csv, semi.csv], label_column: diagnosis}\n", "s.yaml"))
    with pytest.raises(DataError, match="';'-separated"):
        scenario_data(cfg)


def test_too_many_sites_and_a_large_delta_are_refused_before_start(tmp_path):
    _cancer_frame().iloc[:60].to_csv(tmp_path / "small.csv", index=False)
    cfg = load_scenario(_write(tmp_path, "num_sites: 50\nstrategy: {min_sites: 2}\n"
                                         "data: {table: small.csv, label_column: diagnosis}\n"))
    with pytest.raises(DataError, match="num_sites 50"):
        check_scenario_data(cfg)
    cfg = load_scenario(_write(tmp_path, "num_sites: 2\ndata: {table: small.csv, label_column: diagnosis}\n"
                                         "privacy: {delta: 0.1}\n", "dp.yaml"))
    with pytest.raises(DataError, match=r"privacy.delta 0.1 is not below 1/n"):
        check_scenario_data(cfg)


@pytest.mark.parametrize(("case", "message"), [
    ("missing_file", "file not found"),
    ("missing_values", "missing values in columns: f1 (3)"),
    ("bad_label", "label column 'diagnosis' not found"),
])
def test_bad_tables_exit_2_with_one_line_and_leave_no_output(tmp_path, site_csvs, case, message):
    if case == "missing_values":
        df = pd.read_csv(site_csvs[1])
        df.loc[:2, "f1"] = np.nan
        df.to_csv(site_csvs[1], index=False)
    if case == "bad_label":
        pd.read_csv(site_csvs[0]).rename(columns={"diagnosis": "dx"}).to_csv(site_csvs[0], index=False)
    tables = [str(p) for p in site_csvs] + (["data/nope.csv"] if case == "missing_file" else [])
    scen = _write(tmp_path, f"data: {{tables: {json.dumps(tables)}, label_column: diagnosis}}\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "fedseek", "simulate", str(scen), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_simulate_on_per_site_csvs_matches_a_pooled_logistic_regression(tmp_path):
    """Four centres of different sizes (one tiny) from a real table; fedseek's model against a pooled central baseline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    bc = load_breast_cancer()
    df = pd.DataFrame(bc.data, columns=[f"f{i}" for i in range(bc.data.shape[1])])
    df["y"] = bc.target
    train, test = train_test_split(df, test_size=0.25, random_state=0, stratify=df["y"])
    sizes = [180, 120, 100, len(train) - 400]
    bounds = np.cumsum([0, *sizes])
    for i in range(4):
        train.iloc[bounds[i]:bounds[i + 1]].to_csv(tmp_path / f"c{i}.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    scen = _write(tmp_path, "name: centres\nseed: 1\nrounds: 12\nstrategy: {min_sites: 4}\n"
                            "data: {tables: [c0.csv, c1.csv, c2.csv, c3.csv], label_column: y, test_table: test.csv}\n"
                            "train: {local_epochs: 2, lr: 0.05, batch_size: 16}\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "fedseek", "simulate", str(scen), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    xs = StandardScaler().fit(train.drop(columns="y"))
    pooled = LogisticRegression(max_iter=2000).fit(xs.transform(train.drop(columns="y")), train["y"])
    central = pooled.score(xs.transform(test.drop(columns="y")), test["y"])
    print("own tables: fedseek", summary["final_accuracy"], "pooled logistic regression", central)
    assert summary["final_accuracy"] >= central - 0.03
    assert summary["rounds_completed"] == 12 and summary["name"] == "centres"
