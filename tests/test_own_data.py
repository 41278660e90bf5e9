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
    ("float_label", "continuous target, not classes"),
    ("semicolons", "';'-separated: fedseek reads comma-separated CSV"),
    ("duplicate_columns", "duplicated column names ['f1']"),
    ("too_many_sites", "num_sites (10000) exceeds"),
    ("large_delta", "privacy.delta 0.1 is not below 1/n"),
    ("empty_yaml", "empty scenario"),
    ("site_delta", "not below 1/n of the largest site (300 rows)"),
])
def test_bad_tables_exit_2_with_one_line_and_leave_no_output(tmp_path, site_csvs, case, message, capsys):
    """Through the CLI's entry point in-process (the same code as the console script, without a fresh interpreter each)."""
    from fedseek.ops.cli import main

    scenario_text = None
    if case == "float_label":
        df = pd.read_csv(site_csvs[0])
        df["diagnosis"] = np.linspace(0.1, 9.9, len(df))
        df.to_csv(site_csvs[0], index=False)
    if case == "semicolons":
        pd.read_csv(site_csvs[2]).to_csv(site_csvs[2], index=False, sep=";")
    if case == "duplicate_columns":
        text = site_csvs[1].read_text().splitlines()
        site_csvs[1].write_text("\n".join([text[0].replace("f2", "f1")] + text[1:]) + "\n")
    if case == "too_many_sites":
        scenario_text = "num_sites: 10000\nstrategy: {min_sites: 2}\n"
    if case == "large_delta":
        scenario_text = "num_sites: 10\nprivacy: {delta: 0.1}\n"
    if case == "empty_yaml":
        scenario_text = "# to be written\n"
    if case == "missing_values":
        df = pd.read_csv(site_csvs[1])
        df.loc[:2, "f1"] = np.nan
        df.to_csv(site_csvs[1], index=False)
    if case == "bad_label":
        pd.read_csv(site_csvs[0]).rename(columns={"diagnosis": "dx"}).to_csv(site_csvs[0], index=False)
    tables = [str(p) for p in site_csvs] + (["data/nope.csv"] if case == "missing_file" else [])
    dp = "privacy: {delta: 0.01}\n" if case == "site_delta" else ""
    scen = _write(tmp_path, scenario_text if scenario_text is not None
                  else f"data: {{tables: {json.dumps(tables)}, label_column: diagnosis}}\n{dp}")
    out = tmp_path / "out"
    code = main(["simulate", str(scen), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr, stderr
    assert not out.exists()


@pytest.mark.slow
def test_per_site_csvs_match_a_pooled_logistic_regression(tmp_path):
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
                            "train: {local_epochs: 2, lr: 0.05, batch_size: 16}\nselection: {metric: loss}\n")
    out = tmp_path / "out"
    # in-process (the coordinator and the real ClientApp); `fedseek simulate` on per-site tables runs in
    # tests/test_ray_cluster.py (Ray workers loading each site's own file)
    from tests.test_coordinator import run_in_process

    run_in_process(scen, out, 4)
    summary = json.loads((out / "summary.json").read_text())
    xs = StandardScaler().fit(train.drop(columns="y"))
    pooled = LogisticRegression(max_iter=2000).fit(xs.transform(train.drop(columns="y")), train["y"])
    central = pooled.score(xs.transform(test.drop(columns="y")), test["y"])
    print("own tables: fedseek", summary["final_accuracy"], "pooled logistic regression", central)
    assert summary["final_accuracy"] >= central - 0.03
    assert summary["rounds_completed"] == 12 and summary["name"] == "centres"
    sel = summary["selection"]
    assert sel["metric"] == "loss" and 1 <= sel["round"] <= 12 and "lowest central loss" in sel["reason"]
    assert summary["baseline"]["warning"] is None and summary["warnings"] == []
    card = json.loads((out / "model.json").read_text())
    assert card["features"] == [f"f{i}" for i in range(30)] and card["classes"] == ["0", "1"]
    assert card["preprocessing"]["scaling"] == "local" and card["training"]["round"] == sel["round"]
    assert (out / "model_last.pt").exists()

    # fedseek predict on the held-out table equals the card's preprocessing + model.pt applied by hand
    res = subprocess.run([sys.executable, "-m", "fedseek", "predict", "--model", str(out), "--input", str(tmp_path / "test.csv"),
                          "--out", str(tmp_path / "pred.csv")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import torch

    from fedseek.train.models import build_model

    model = build_model("mlp", (30,), 2, card["hidden"], seed=0)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = test.drop(columns="y").to_numpy(dtype=np.float64)
    with torch.no_grad():
        p = torch.softmax(model(torch.as_tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)), dim=1).numpy()
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert np.allclose(pred[["prob_0", "prob_1"]].to_numpy(), p, atol=1e-5)
    assert (pred["predicted"].astype(int).to_numpy() == p.argmax(1)).all()
    assert abs(float((pred["predicted"].astype(int) == test["y"].to_numpy()).mean()) - sel["central"]["accuracy"]) < 1e-9

    # the same tables under DP-SGD: each site within its budget, the card says so (in-process: the simulation path of
    # own tables is what ran above; this checks the DP outputs)
    from tests.test_coordinator import run_in_process

    dp = _write(tmp_path, scen.read_text().replace("rounds: 12", "rounds: 4")
                + "privacy: {epsilon_budget: 3.0, delta: 1.0e-4, planning_rounds: 4}\n", "dp.yaml")
    run_in_process(dp, tmp_path / "dp", 4, state_dir=tmp_path / "dp_sites")
    dps = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert dps["privacy"]["enabled"] and 0 < dps["privacy"]["max_epsilon"] <= 3.0
    dcard = json.loads((tmp_path / "dp" / "model.json").read_text())
    assert dcard["privacy"]["dp"] and dcard["privacy"]["max_epsilon"] == dps["privacy"]["max_epsilon"]
    print("own tables under DP (eps <= 3):", dps["final_accuracy"])


# ------------------------------------------------------------------ selection, model card, predict, run directory


def test_selection_keeps_the_best_round_and_stops_after_patience():
    from fedseek.config.federation import SelectionSpec
    from fedseek.runtime.selection import Selection

    sel = Selection(SelectionSpec(metric="accuracy", patience=2, min_delta=0.001))
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    history = [0.80, 0.90, 0.9005, 0.85]
    stops = []
    for rnd, acc in enumerate(history, start=1):
        arrays["w"][:] = rnd
        stops.append(sel.observe(rnd, {"accuracy": acc, "loss": 1 - acc}, arrays))
    assert stops == [False, False, False, True]  # 0.9005 is not an improvement of >= 0.001
    assert sel.best_round == 2 and sel.best_arrays is not None and sel.best_arrays["w"][0] == 2.0
    s = sel.summary(4)
    assert s.round == 2 and s.value == pytest.approx(0.90) and s.early_stopped_after == 4 and "highest central accuracy" in s.reason
    restored = Selection(SelectionSpec(metric="accuracy"))
    restored.load_state_dict(sel.state_dict())
    assert restored.best_round == 2 and restored.rounds_without_gain == 2
    loss = Selection(SelectionSpec(metric="loss"))
    for rnd, v in enumerate([0.5, 0.3, 0.4], start=1):
        loss.observe(rnd, {"loss": v}, arrays)
    assert loss.best_round == 2
    with pytest.raises(ValueError, match="patience needs a metric"):
        SelectionSpec(patience=3)


def test_baseline_check_warns_for_a_majority_class_model():
    from fedseek.data import ArrayDataset
    from fedseek.runtime.selection import baseline_check

    test = ArrayDataset(np.zeros((10, 2)), np.array([0] * 8 + [1] * 2), 2, classes=["healthy", "sick"])
    majority = baseline_check(test, {"accuracy": 0.8, "balanced_accuracy": 0.5}, np.zeros(10, dtype=int))
    assert majority is not None and majority.warning is not None and "'healthy' for everyone" in majority.warning
    assert majority.recall == {"healthy": 1.0, "sick": 0.0} and majority.majority_accuracy == 0.8
    good = baseline_check(test, {"accuracy": 0.9, "balanced_accuracy": 0.75}, np.array([0] * 8 + [1, 0]))
    assert good is not None and good.warning is None and good.recall["sick"] == 0.5


def _run_dir_with_model(tmp_path: Path, scaling: str = "local") -> tuple[Path, object]:
    import torch

    from fedseek.outputs.model_card import ModelCard, Preprocessing
    from fedseek.train.models import build_model

    run = tmp_path / "run"
    run.mkdir()
    model = build_model("mlp", (6,), 2, [8], seed=3)
    torch.save(model.state_dict(), run / "model.pt")
    card = ModelCard(kind="mlp", hidden=[8], input_shape=[6], num_classes=2, features=[f"f{i}" for i in range(6)],
                     classes=["benign", "malignant"],
                     preprocessing=Preprocessing(scaling=scaling, columns=[f"f{i}" for i in range(6)]))
    (run / "model.json").write_text(card.model_dump_json())
    return run, model


def test_predict_applies_the_card_preprocessing_and_writes_probabilities(tmp_path):
    import torch

    run, model = _run_dir_with_model(tmp_path)
    df = _cancer_frame().iloc[:50]
    df = df[["diagnosis", *reversed([f"f{i}" for i in range(6)])]]  # other column order, plus the label: both fine
    df.to_csv(tmp_path / "new.csv", index=False)
    res = subprocess.run([sys.executable, "-m", "fedseek", "predict", "--model", str(run), "--input", str(tmp_path / "new.csv"),
                          "--out", str(tmp_path / "pred.csv")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pred = pd.read_csv(tmp_path / "pred.csv")
    x = df[[f"f{i}" for i in range(6)]].to_numpy(dtype=np.float64)
    std = x.std(axis=0)
    by_hand = (x - x.mean(axis=0)) / np.where(std < 1e-12, 1.0, std)
    with torch.no_grad():
        p = torch.softmax(model(torch.as_tensor(by_hand, dtype=torch.float32)), dim=1).numpy()  # type: ignore[operator]
    assert np.allclose(pred[["prob_benign", "prob_malignant"]].to_numpy(), p, atol=1e-5)
    assert list(pred["predicted"]) == [["benign", "malignant"][k] for k in p.argmax(1)]
    assert list(pred["diagnosis"]) == list(df["diagnosis"])  # the input rows are kept


@pytest.mark.parametrize(("case", "message"), [
    ("no_card", "model.json: not found"),
    ("missing_feature", "feature columns ['f5'] not found"),
    ("one_row", "needs a batch of rows"),
    ("builtin", "preprocessing 'builtin'"),
])
def test_predict_refuses_bad_inputs_with_one_line_and_exit_2(tmp_path, case, message):
    run, _ = _run_dir_with_model(tmp_path, scaling="builtin" if case == "builtin" else "local")
    df = _cancer_frame().iloc[: 1 if case == "one_row" else 20]
    if case == "missing_feature":
        df = df.drop(columns="f5")
    if case == "no_card":
        (run / "model.json").unlink()
    df.to_csv(tmp_path / "in.csv", index=False)
    res = subprocess.run([sys.executable, "-m", "fedseek", "predict", "--model", str(run), "--input", str(tmp_path / "in.csv"),
                          "--out", str(tmp_path / "p.csv")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()


def test_a_busy_run_directory_is_refused_and_a_finished_run_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    hold = ("import sys, time; from pathlib import Path; from fedseek.ops.launcher import lock_out; "
            "lock_out(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "fedseek", "simulate", "simulations/hospitals.yaml", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and f"in use by another fedseek run (pid {holder.pid})" in res.stderr, res.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    (out / "summary.json").write_text(json.dumps({"name": "x", "rounds": 3, "rounds_completed": 3, "status": "completed",
                                                  "num_sites": 2, "strategy": "fedavg", "seed": 0, "final_accuracy": 0.9}))
    res = subprocess.run([sys.executable, "-m", "fedseek", "simulate", "simulations/hospitals.yaml", "--out", str(out), "--resume"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "already completed (3/3 rounds" in res.stderr and "nothing to resume" in res.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing ran


def test_declared_preprocessing_one_hot_fill_and_given_scaling_travel_to_predict(tmp_path):
    """A categorical column one-hot from its declared vocabulary (a site lacking a value still gets the column), a declared
    fill for missing numbers, given scaling statistics: the same feature vector at every site and in `fedseek predict`."""
    from fedseek.config.preprocess import PreprocessSpec
    from fedseek.data.preprocess import prepare_features

    spec = PreprocessSpec(categorical={"smoker": ["no", "yes", "former"]}, fill={"chol": 200.0}, scaling="given",
                          mean={"age": 50.0, "chol": 210.0}, std={"age": 10.0, "chol": 40.0})
    df = pd.DataFrame({"age": [40.0, 60.0], "smoker": ["yes", "no"], "chol": [np.nan, 250.0]})
    x, names = prepare_features("t.csv", df, ["age", "smoker", "chol"], spec)
    assert names == ["age", "smoker=no", "smoker=yes", "smoker=former", "chol"]
    assert np.allclose(x, [[-1.0, 0, 1, 0, -0.25], [1.0, 1, 0, 0, 1.0]])
    with pytest.raises(DataError, match=r"'smoker' has 1 values outside its declared vocabulary"):
        prepare_features("t.csv", df.assign(smoker=["yes", "sometimes"]), ["age", "smoker", "chol"], spec)
    with pytest.raises(DataError, match=r"missing values in columns: age \(1\)"):
        prepare_features("t.csv", df.assign(age=[np.nan, 1.0]), ["age", "smoker", "chol"], spec)
    with pytest.raises(ValueError, match="mean and std"):
        PreprocessSpec(scaling="given", mean={"age": 1.0})
    with pytest.raises(ValueError, match="YAML boolean"):
        PreprocessSpec.model_validate({"categorical": {"smoker": [False, True]}})

    # a scenario with this preprocessing: every site has the same 5 features, the card records it, predict applies it
    rng = np.random.default_rng(0)
    n = 120
    table = pd.DataFrame({"age": rng.normal(50, 10, n), "smoker": rng.choice(["no", "yes", "former"], n),
                          "chol": np.where(rng.random(n) < 0.1, np.nan, rng.normal(210, 40, n))})
    table["y"] = np.where(table["age"] + 10 * (table["smoker"] == "yes") > 55, "high", "low")
    table.iloc[:60].to_csv(tmp_path / "a.csv", index=False)
    table.iloc[60:][table.iloc[60:]["smoker"] != "former"].to_csv(tmp_path / "b.csv", index=False)  # site b: no former smokers
    cfg = load_scenario(_write(tmp_path, "data: {tables: [a.csv, b.csv], label_column: y, preprocessing: {categorical: {smoker: "
                                         "['no', 'yes', former]}, fill: {chol: 200}, scaling: given, mean: {age: 50, chol: 210}, "
                                         "std: {age: 10, chol: 40}}}\n"))
    data = scenario_data(cfg)
    assert data.train.features == names and data.train.columns == ["age", "smoker", "chol"]
    task = scenario_task(cfg)
    from fedseek.outputs.model_card import card_spec, preprocessing_facts

    facts = preprocessing_facts(task.preprocess, task.columns, builtin=False)
    assert facts.scaling == "given" and facts.columns == ["age", "smoker", "chol"] and facts.categorical["smoker"][2] == "former"
    card = type("C", (), {"preprocessing": facts})()
    again, again_names = prepare_features("a.csv", table.iloc[:60], facts.columns, card_spec(card))  # type: ignore[arg-type]
    assert again_names == names and np.allclose(again, data.train.x[data.parts[0]], atol=1e-6)


def test_more_sites_than_rows_of_a_builtin_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"num_sites \(10000\) exceeds the ~426 training rows of breast_cancer"):
        load_scenario(_write(tmp_path, "num_sites: 10000\ndata: {dataset: breast_cancer}\n"))
    assert load_scenario(_write(tmp_path, "num_sites: 400\ndata: {dataset: breast_cancer}\n", "ok.yaml")).num_sites == 400
    with pytest.raises(ConfigError, match=r"privacy.delta 0.1 is not below 1/n"):
        load_scenario(_write(tmp_path, "num_sites: 10\nprivacy: {delta: 0.1}\n", "dp.yaml"))


@pytest.mark.slow
def test_shipped_wine_example_matches_a_pooled_logistic_regression(tmp_path):
    """simulations/wine.yaml (a real table, 4 sites, Dirichlet 1.0): fedseek's model against a pooled central logistic
    regression on the same split, accuracy within 1 point and macro one-vs-rest AUC within 0.02 (from `fedseek predict`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from fedseek.data.builtin import stratified_split
    from tests.test_coordinator import run_in_process

    scen = ROOT / "simulations" / "wine.yaml"
    cfg = load_scenario(scen)
    out = tmp_path / "wine"
    # in-process (the coordinator and the real ClientApp, no Flower transport): what is checked is the example's model;
    # `fedseek simulate` on own tables runs in test_simulate_on_per_site_csvs_matches_a_pooled_logistic_regression
    run_in_process(scen, out, cfg.num_sites, state_dir=tmp_path / "sites")
    df = pd.read_csv(ROOT / "simulations" / "data" / "wine.csv")
    names = sorted(df["cultivar"].unique())
    y = df["cultivar"].map({n: i for i, n in enumerate(names)}).to_numpy()
    train_idx, test_idx = stratified_split(len(df), y, cfg.data.test_fraction, cfg.seed)  # the scenario's own split
    df.iloc[test_idx].to_csv(tmp_path / "test.csv", index=False)
    res = subprocess.run([sys.executable, "-m", "fedseek", "predict", "--model", str(out), "--input", str(tmp_path / "test.csv"),
                          "--out", str(tmp_path / "pred.csv")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pred = pd.read_csv(tmp_path / "pred.csv")
    fed_acc = float((pred["predicted"] == pred["cultivar"]).mean())
    summary = json.loads((out / "summary.json").read_text())
    assert fed_acc == pytest.approx(summary["final_accuracy"])  # predict and the coordinator's evaluation agree
    fed_auc = roc_auc_score(y[test_idx], pred[[f"prob_{n}" for n in names]].to_numpy(), multi_class="ovr")
    x = df.drop(columns="cultivar").to_numpy()
    scaler = StandardScaler().fit(x[train_idx])
    pooled = LogisticRegression(max_iter=5000).fit(scaler.transform(x[train_idx]), y[train_idx])
    central_acc = pooled.score(scaler.transform(x[test_idx]), y[test_idx])
    central_auc = roc_auc_score(y[test_idx], pooled.predict_proba(scaler.transform(x[test_idx])), multi_class="ovr")
    print(f"wine: fedseek accuracy {fed_acc:.4f} AUC {fed_auc:.4f}; pooled logistic regression {central_acc:.4f} / {central_auc:.4f}")
    assert fed_acc >= central_acc - 0.01 and fed_auc >= central_auc - 0.02


def test_report_shows_the_kept_round_and_the_baseline_warning(tmp_path):
    from fedseek.outputs.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "name": "x", "rounds": 5, "rounds_completed": 5, "num_sites": 2, "strategy": "fedavg", "seed": 0,
        "selection": {"metric": "balanced_accuracy", "round": 3, "value": 0.5, "reason": "highest central balanced_accuracy"},
        "warnings": ["the model does not beat the majority-class baseline: <b>"]}))
    html = write_report(run).read_text()
    assert "round 3: highest central balanced_accuracy" in html
    assert "Warning: the model does not beat the majority-class baseline: &lt;b&gt;" in html  # escaped


def test_selection_on_the_federated_evaluation_judges_only_evaluated_rounds():
    from fedseek.config import ScenarioConfig
    from fedseek.config.federation import SelectionSpec
    from fedseek.outputs.schema import FederatedEvalRow, MetricsRow
    from fedseek.runtime.selection import Selection

    sel = Selection(SelectionSpec(metric="balanced_accuracy", source="federated", patience=2))
    arrays = {"w": np.zeros(1, dtype=np.float32)}

    def row(rnd: int, fed: float | None) -> MetricsRow:
        federated = FederatedEvalRow(round=rnd, evaluated=3, balanced_accuracy=fed) if fed is not None else None
        return MetricsRow(round=rnd, time=0.0, round_seconds=1.0, central={"balanced_accuracy": 0.99}, federated=federated)

    stops = [sel.observe(r, sel.judged(row(r, f)), arrays) for r, f in [(1, 0.6), (2, None), (3, 0.7), (4, None), (5, 0.65), (6, 0.69)]]
    assert stops == [False, False, False, False, False, True]  # rounds without an evaluation do not use up patience
    assert sel.best_round == 3 and "federated-evaluation balanced_accuracy" in sel.summary(6).reason
    with pytest.raises(ValueError, match="needs a federated evaluation"):
        ScenarioConfig.model_validate({"selection": {"metric": "accuracy", "source": "federated"}})
    with pytest.raises(ValueError, match="not auc"):
        SelectionSpec(metric="auc", source="federated")
