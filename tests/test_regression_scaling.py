"""Regression (`task: regression`) and federation-wide scaling statistics (`scaling: federated`).

Fast tier: the loader and config checks (one line each), the site's statistics handler in-process
with its real ledger (the DP release is charged before it is computed), the coordinator's pooling
and reply screening, a whole federation against a fake Grid with the real ClientApp, `fedseek
predict` on a regression card. Slow tier: the shipped diabetes example through `fedseek simulate`
against a pooled central linear regression on the same split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedseek.config import ConfigError, load_scenario
from fedseek.data import DataError
from fedseek.data.loaders import load_table
from fedseek.data.scenario_data import check_scenario_data, scenario_data
from fedseek.runtime.federated_scaling import Request, check_stats, pool
from fedseek.wire.records import CONFIG, METRICS, StatsReply, StatsRequest, refusal_reason
from tests.conftest import ROOT
from tests.test_coordinator import FakeGrid, in_process_sites

DIABETES = ROOT / "simulations" / "data" / "diabetes.csv"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


def _scenario(tmp_path: Path, *, private: bool = False, bounds: bool = True, **over: object) -> Path:
    cfg: dict = {
        "name": "reg", "seed": 3, "num_sites": 3, "rounds": 2,
        "data": {"table": str(DIABETES), "label_column": "progression", "task": "regression",
                 "preprocessing": {"scaling": "federated"}},
        "model": {"kind": "mlp", "hidden": [16]}, "strategy": {"min_sites": 3},
        "train": {"local_epochs": 1, "lr": 0.02, "batch_size": 16}, "simulation": {"node_wait_s": 5}, "round_timeout_s": 30,
    }
    if bounds:
        ranges = yaml.safe_load((ROOT / "simulations" / "diabetes.yaml").read_text())["data"]["preprocessing"]["bounds"]
        cfg["data"]["preprocessing"]["bounds"] = ranges
    if private:
        cfg["privacy"] = {"epsilon_budget": 3.0, "delta": 1e-3, "planning_rounds": 2, "scaling_epsilon": 0.5}
    cfg.update(over)
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------ loader and config
def test_a_regression_table_loads_its_target_as_numbers_and_scales_it_with_given_statistics(tmp_path):
    from fedseek.config.preprocess import PreprocessSpec

    ds = load_table(DIABETES, "progression", task="regression", standardize=False)
    raw = pd.read_csv(DIABETES)
    assert ds.regression and ds.num_classes == 1 and ds.classes is None and ds.y.dtype == np.float32
    assert np.allclose(ds.y, raw["progression"]) and ds.features == FEATURES
    spec = PreprocessSpec(scaling="given", mean={**dict.fromkeys(FEATURES, 0.0), "progression": 150.0},
                          std={**dict.fromkeys(FEATURES, 1.0), "progression": 75.0})
    scaled = load_table(DIABETES, "progression", task="regression", preprocessing=spec)
    assert scaled.target_scale == (150.0, 75.0) and np.allclose(scaled.y, (raw["progression"] - 150.0) / 75.0, atol=1e-5)
    assert scaled.schema().task == "regression"


def test_regression_label_problems_are_one_line_data_errors(tmp_path):
    df = pd.read_csv(DIABETES).iloc[:20].astype({"progression": object})
    df.loc[3, "progression"] = "high"
    df.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DataError, match=r"1 non-numeric values \(e.g. \['high'\]\): task: regression needs a number"):
        load_table(tmp_path / "text.csv", "progression", task="regression")
    df.loc[3, "progression"] = None
    df.to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(DataError, match=r"1 missing or infinite values"):
        load_table(tmp_path / "missing.csv", "progression", task="regression")
    pd.read_csv(DIABETES).assign(progression=lambda d: d.progression + 0.5).to_csv(tmp_path / "float.csv", index=False)
    with pytest.raises(DataError, match=r"continuous target, not classes; set task: regression"):
        load_table(tmp_path / "float.csv", "progression")


@pytest.mark.parametrize(("over", "message"), [
    ({"selection": {"metric": "accuracy"}}, "selection.metric 'accuracy' is for classification"),
    ({"train": {"class_weighting": "balanced"}}, "class_weighting applies to classification"),
    ({"watermark": {"enabled": True}}, "not available with task: regression"),
    ({"partition": {"scheme": "dirichlet"}}, "dirichlet splits by class"),
])
def test_settings_that_need_classes_are_refused_for_a_regression(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario(_scenario(tmp_path, **over))


def test_a_regression_metric_is_refused_for_a_classification(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nselection: {metric: r2}\n")
    with pytest.raises(ConfigError, match="selection.metric 'r2' is for task: regression"):
        load_scenario(path)


def test_federated_scaling_under_dp_needs_bounds_for_every_numeric_column(tmp_path):
    cfg = load_scenario(_scenario(tmp_path, private=True, bounds=False))
    with pytest.raises(DataError, match=r"needs public \[low, high\] bounds for every numeric column.*'age'.*'progression'"):
        check_scenario_data(cfg)
    typo = _scenario(tmp_path, private=True)
    text = yaml.safe_load(typo.read_text())
    text["data"]["preprocessing"]["bounds"]["agee"] = [0, 1]
    typo.write_text(yaml.safe_dump(text))
    with pytest.raises(DataError, match=r"\['agee'\] are not numeric feature columns or the label"):
        check_scenario_data(load_scenario(typo))
    with pytest.raises(ConfigError, match="bounds apply with scaling: federated"):
        load_scenario(_scenario(tmp_path, data={"table": str(DIABETES), "label_column": "progression", "task": "regression",
                                                "preprocessing": {"scaling": "none", "bounds": {"age": [0, 1]}}}))


def test_federated_scaling_keeps_the_sites_rows_raw_until_the_statistics_arrive(tmp_path):
    data = scenario_data(load_scenario(_scenario(tmp_path)))
    raw = pd.read_csv(DIABETES)
    assert data.train.x[:, 0].min() >= raw["age"].min() and data.train.x[:, 0].max() <= raw["age"].max()  # not scaled
    assert data.test is not None and data.test.regression and len(data.test) + len(data.train) == len(raw)


# ------------------------------------------------------------------ the site's statistics (in-process, real ledger)
def _stats_message(req: StatsRequest, node: int = 1) -> Message:
    return Message(content=RecordDict({CONFIG: req.to_record()}), dst_node_id=node, message_type="query.stats")


def _site(scen: Path, out: Path, pid: int = 0) -> tuple[dict, Context]:
    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(out), "state-dir": "", "resume": False}
    return rc, Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid}, state=RecordDict(), run_config=rc)


def test_a_dp_site_charges_its_ledger_before_it_releases_noisy_clipped_sums(tmp_path):
    from clients.app import app
    from fedseek.privacy import PrivacyLedger
    from fedseek.privacy.accounting import epsilon_for, fit_noise

    scen = _scenario(tmp_path, private=True)
    cfg = load_scenario(scen)
    bounds = {k: tuple(v) for k, v in cfg.data.preprocess.bounds.items()}
    _, ctx = _site(scen, tmp_path / "out")
    reply = app(_stats_message(StatsRequest(run_id="r1", columns=FEATURES, target="progression", bounds=bounds)), ctx)
    assert refusal_reason(reply.content) is None
    m = StatsReply.from_record(reply.content.metric_records[METRICS])
    sigma = fit_noise((), 1.0, 1, 0.5, 1e-3, "prv")
    assert m.normalized == 1 and m.noise_std == pytest.approx(sigma * math.sqrt(2 * 11)) and len(m.sums) == 11
    ledger = PrivacyLedger(tmp_path / "out" / "sites" / "site-000", accountant="prv", delta=1e-3, epsilon_budget=3.0, site="site-000")
    assert ledger.history == [(pytest.approx(sigma), 1.0, 1)] and [r.server_round for r in ledger.rounds] == [0]
    assert m.epsilon == pytest.approx(epsilon_for([(sigma, 1.0, 1)], 1e-3, "prv")) and m.epsilon <= 0.5 + 1e-6
    assert ledger.rounds_charged() == 0  # the statistics release is not a training round of the site's planning horizon
    # no bounds for a column under DP: refused before anything is charged
    reply = app(_stats_message(StatsRequest(run_id="r1", columns=FEATURES, bounds={})), ctx)
    assert "needs public bounds" in str(refusal_reason(reply.content))
    assert len(PrivacyLedger(ledger.path.parent, accountant="prv", delta=1e-3, epsilon_budget=3.0, site="site-000").history) == 1


def test_a_coordinator_asking_again_pays_again_until_the_site_refuses(tmp_path):
    """A hostile coordinator that repeats the statistics request (to average the noise away) is charged every time."""
    from clients.app import app
    from fedseek.privacy import PrivacyLedger

    scen = _scenario(tmp_path, private=True, privacy={"epsilon_budget": 1.0, "delta": 1e-3, "scaling_epsilon": 0.5})
    bounds = {k: tuple(v) for k, v in load_scenario(scen).data.preprocess.bounds.items()}
    _, ctx = _site(scen, tmp_path / "out")
    reasons = []
    for i in range(6):
        reply = app(_stats_message(StatsRequest(run_id=f"r{i}", columns=FEATURES, bounds=bounds)), ctx)
        reasons.append(refusal_reason(reply.content))
    led = PrivacyLedger(tmp_path / "out" / "sites" / "site-000", accountant="prv", delta=1e-3, epsilon_budget=1.0, site="site-000")
    answered = sum(r is None for r in reasons)
    assert 1 <= answered < 6 and len(led.history) == answered and led.epsilon() <= 1.0
    assert all("scaling statistics:" in str(r) for r in reasons[answered:])


def test_regression_evaluation_replies_that_cannot_be_true_are_rejected():
    from fedseek.runtime.federated_eval import check_reply
    from fedseek.wire.records import EvalMetrics

    def content(**kw: object) -> RecordDict:
        base = {"num_examples": 10, "class_counts": [10.0], "class_correct": [0.0], "loss_sum": 1.0, "loss_clip": 50.0}
        return RecordDict({METRICS: EvalMetrics(**{**base, **kw}).to_record()})

    assert check_reply(content(target_sums=[1.0, 2.0, -3.0, 4.0]), 1, regression=True)[0] == ""
    assert "outside" in check_reply(content(target_sums=[11.5, 2.0, 0.0, 4.0]), 1, regression=True)[0]
    assert "outside" in check_reply(content(target_sums=[1.0, 2.0, -30.0, 4.0]), 1, regression=True)[0]
    assert "needs target-sums" in check_reply(content(), 1, regression=True)[0]
    assert "held-out size" in check_reply(content(class_counts=[3.0], target_sums=[1.0, 1.0, 1.0, 1.0]), 1, regression=True)[0]
    assert "in a classifier's evaluation" in check_reply(content(class_counts=[5.0, 5.0], class_correct=[1.0, 1.0],
                                                                 target_sums=[1.0, 1.0, 1.0, 1.0]), 2)[0]


def test_a_site_refuses_statistics_of_rows_it_already_scales(tmp_path):
    from clients.app import app

    scen = _scenario(tmp_path, data={"table": str(DIABETES), "label_column": "progression", "task": "regression"})
    _, ctx = _site(scen, tmp_path / "out")
    reply = app(_stats_message(StatsRequest(run_id="r", columns=FEATURES)), ctx)
    assert "preprocessing.scaling is 'local'" in str(refusal_reason(reply.content))


# ------------------------------------------------------------------ pooling and screening at the coordinator
def test_pooled_exact_statistics_equal_the_pooled_rows_and_dp_replies_map_back_to_raw_units():
    rng = np.random.default_rng(0)
    parts = [rng.normal(50, 10, size=(n, 2)) for n in (30, 70, 5)]
    req = Request(["a", "b"], None)
    replies = [StatsReply(num_examples=len(p), sums=p.sum(0).tolist(), squares=(p**2).sum(0).tolist()) for p in parts]
    fitted, noise = pool(replies, req)
    allx = np.concatenate(parts)
    assert np.allclose([fitted.mean["a"], fitted.mean["b"]], allx.mean(0)) and np.allclose([fitted.std["a"], fitted.std["b"]], allx.std(0))
    assert noise == {"a": 0.0, "b": 0.0}
    # the DP form (centred at the midpoint, over the half-range), here without noise: the same pooled values
    bounded = Request(["a", "b"], None, {"a": (0.0, 100.0), "b": (0.0, 100.0)})
    z = [(p - 50.0) / 50.0 for p in parts]
    dp = [StatsReply(num_examples=len(q), sums=q.sum(0).tolist(), squares=(q**2).sum(0).tolist(), normalized=1) for q in z]
    fitted_dp, _ = pool(dp, bounded)
    assert np.allclose([fitted_dp.mean["a"], fitted_dp.std["a"]], [allx[:, 0].mean(), allx[:, 0].std()])


@pytest.mark.parametrize(("reply", "message"), [
    (StatsReply(num_examples=10, sums=[1.0], squares=[1.0]), "statistics for 1 columns, 2 were asked for"),
    (StatsReply(num_examples=10, sums=[100.0, 1.0], squares=[5.0, 1.0]), "impossible for 10 values"),
    (StatsReply(num_examples=10, sums=[1.0, 1.0], squares=[-3.0, 1.0]), "impossible for 10 values"),
    (StatsReply(num_examples=10, sums=[500.0, 1.0], squares=[5.0, 1.0], normalized=1, noise_std=1.0), "beyond the noise"),
    (StatsReply(num_examples=10, sums=[1.0, 1.0], squares=[5.0, 1.0], noise_std=2.0), "noise without the normalised"),
])
def test_impossible_statistics_are_rejected(reply, message):
    req = Request(["a", "b"], None, {"a": (0.0, 1.0), "b": (0.0, 1.0)})
    assert message in check_stats(reply, req)


# ------------------------------------------------------------------ a whole federation against a fake Grid
def _coordinate(scen: Path, out: Path, nodes: list[int], respond=None):
    from fedseek.runtime.coordinator import run_coordinator

    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(out), "state-dir": "", "resume": False}
    grid = FakeGrid(nodes, respond or in_process_sites(rc, nodes))
    return grid, run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


def test_a_regression_federation_fits_shared_statistics_first_and_reports_r2(tmp_path):
    scen, out = _scenario(tmp_path, rounds=3), tmp_path / "out"
    grid, summary = _coordinate(scen, out, [1, 2, 3])
    data = scenario_data(load_scenario(scen))
    assert summary.scaling is not None and summary.scaling.sites == 3 and not summary.scaling.dp
    assert summary.scaling.num_examples == len(data.train)
    assert summary.scaling.mean["bmi"] == pytest.approx(float(data.train.x[:, 2].mean()), rel=1e-6)
    assert summary.scaling.std["progression"] == pytest.approx(float(data.train.y.std()), rel=1e-5)
    assert grid.sent[3].metadata.message_type == "query.stats"  # after the three identity queries, before any TRAIN
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert json.loads(str(train[0].content.config_records[CONFIG]["scaling"]))["mean"]["age"] == summary.scaling.mean["age"]
    assert summary.final is not None and set(summary.final) >= {"r2", "rmse", "mae", "loss"} and summary.final_accuracy is None
    assert summary.final["r2"] > summary.initial["r2"] and summary.baseline is not None and summary.baseline.mean_rmse > 0
    card = json.loads((out / "model.json").read_text())
    assert card["task"] == "regression" and card["num_classes"] == 1 and card["preprocessing"]["scaling"] == "federated"
    assert card["target_scale"] == [summary.scaling.mean["progression"], summary.scaling.std["progression"]]
    assert card["preprocessing"]["mean"]["s5"] == summary.scaling.mean["s5"]
    # fedseek predict maps the model's output back to the target's units; equal to the coordinator's test RMSE
    from fedseek.ops.predict import predict_table

    test = data.test
    frame = pd.DataFrame(test.x, columns=FEATURES).assign(progression=test.y)
    frame.to_csv(tmp_path / "test.csv", index=False)
    predict_table(out, tmp_path / "test.csv", tmp_path / "pred.csv")
    pred = pd.read_csv(tmp_path / "pred.csv")
    rmse = float(np.sqrt(np.mean((pred["predicted"] - pred["progression"]) ** 2)))
    assert rmse == pytest.approx(summary.final["rmse"], rel=1e-4)
    from fedseek.outputs.report import write_report

    page = write_report(out).read_text()
    assert "final R²" in page and f"{summary.final['r2']:.4f}" in page


def test_under_dp_each_site_pays_for_the_statistics_once_and_stays_within_budget(tmp_path):
    from fedseek.privacy import PrivacyLedger

    scen, out = _scenario(tmp_path, private=True), tmp_path / "out"
    _, summary = _coordinate(scen, out, [1, 2, 3])
    assert summary.scaling is not None and summary.scaling.dp and summary.scaling.sites == 3
    assert all(v > 0 for v in summary.scaling.mean_noise_std.values()) and summary.scaling.max_epsilon <= 0.5 + 1e-6
    for i in range(3):
        led = PrivacyLedger(out / "sites" / f"site-{i:03d}", accountant="prv", delta=1e-3, epsilon_budget=3.0, site=f"site-{i:03d}")
        assert [r.server_round for r in led.rounds] == [0, 1, 2] and led.rounds[0].sample_rate == 1.0
        assert led.epsilon() <= 3.0
    assert summary.privacy.max_epsilon is not None and summary.privacy.max_epsilon <= 3.0
    assert summary.rounds_completed == 2


def test_the_private_federated_evaluation_of_a_regression_pools_the_sites_held_out_errors(tmp_path):
    """Non-DP: the pooled MSE / MAE / R² equal the final model's on the sites' held-out rows (in the target's units).
    DP: each site charges its evaluation ledger, the figures are noisy and the reply contract holds."""
    import torch

    from fedseek.runtime.site_runtime import resolve_site, scaled_rows
    from fedseek.train.local import predict_values, regression_metrics
    from fedseek.train.models import build_model
    from fedseek.wire.records import FittedScaling

    scen, out = _scenario(tmp_path, rounds=2, evaluation={"every": 1, "holdout_fraction": 0.2}), tmp_path / "out"
    _, summary = _coordinate(scen, out, [1, 2, 3])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fed = rows[-1]["federated"]
    assert fed["evaluated"] == 3 and not fed["noisy"] and fed["accuracy"] is None
    card = json.loads((out / "model.json").read_text())
    model = build_model("mlp", (10,), 1, card["hidden"], seed=0)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert summary.scaling is not None
    fitted = FittedScaling(mean=summary.scaling.mean, std=summary.scaling.std)
    preds, ys = [], []
    for pid in range(3):
        site = resolve_site(_site(scen, out, pid)[1])
        assert site.x_eval is not None and site.y_eval is not None and len(site.y_eval) > 0
        x, y = scaled_rows(site, site.x_eval, site.y_eval, fitted)
        preds.append(predict_values(model, x))
        ys.append(y)
    mean, std = card["target_scale"]
    exact = regression_metrics(np.concatenate(preds) * std + mean, np.concatenate(ys) * std + mean)
    assert fed["loss"] == pytest.approx(exact["loss"], rel=1e-4) and fed["mae"] == pytest.approx(exact["mae"], rel=1e-4)
    assert fed["r2"] == pytest.approx(exact["r2"], rel=1e-3, abs=1e-3)

    from fedseek.privacy import PrivacyLedger

    scen_dp = _scenario(tmp_path, private=True, evaluation={"every": 1, "holdout_fraction": 0.2})
    _, dps = _coordinate(scen_dp, tmp_path / "dp", [1, 2, 3])
    drow = json.loads((tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()[-1])["federated"]
    assert drow["evaluated"] == 3 and drow["noisy"] and drow["loss"] is not None and drow["loss_std"] > 0
    led = PrivacyLedger(tmp_path / "dp" / "sites" / "site-000", accountant="prv", delta=1e-3, epsilon_budget=3.0, site="site-000",
                        kind="evaluation")
    assert [r.server_round for r in led.rounds] == [1, 2] and 0 < led.epsilon() <= 3.0


def test_a_site_lying_about_its_statistics_is_rejected_and_the_others_are_pooled(tmp_path):
    scen, out = _scenario(tmp_path, rounds=1), tmp_path / "out"
    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(out), "state-dir": "", "resume": False}
    honest = in_process_sites(rc, [1, 2, 3])

    def respond(node: int, msg: Message) -> Message | None:
        reply = honest(node, msg)
        if node == 3 and msg.metadata.message_type == "query.stats":
            m = StatsReply.from_record(reply.content.metric_records[METRICS])
            reply.content.metric_records[METRICS] = StatsReply(num_examples=m.num_examples, sums=[1e9] * len(m.sums),
                                                               squares=[1.0] * len(m.sums)).to_record()
        return reply

    _, summary = _coordinate(scen, out, [1, 2, 3], respond)
    assert summary.scaling is not None and summary.scaling.sites == 2
    assert summary.scaling.outcomes["site-002"].startswith("rejected:") and summary.rounds_completed == 1
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "scaling_statistics_rejected" and e["site"] == "site-002" for e in events)


def test_no_usable_statistics_fails_the_run_before_round_1_with_a_reason(tmp_path):
    scen, out = _scenario(tmp_path), tmp_path / "out"
    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(out), "state-dir": "", "resume": False}
    honest = in_process_sites(rc, [1, 2, 3])

    def respond(node: int, msg: Message) -> Message | None:
        if msg.metadata.message_type == "query.stats":
            return Message(content=RecordDict({CONFIG: ConfigRecord({"x": 1})}), reply_to=msg)
        return honest(node, msg)

    _, summary = _coordinate(scen, out, [1, 2, 3], respond)
    assert summary.status == "failed" and summary.rounds_completed == 0
    assert "no site gave usable scaling statistics" in str(summary.stop_reason)


# ------------------------------------------------------------------ the shipped example, end to end (slow)
@pytest.mark.slow
def test_shipped_diabetes_regression_matches_a_pooled_linear_regression(tmp_path):
    """simulations/diabetes.yaml (a real table, 4 sites, scaling: federated): R² within 0.05 of a pooled central linear
    regression fitted by the test on the same split; `fedseek predict` gives the coordinator's own test figures."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    from tests.test_coordinator import run_in_process

    scen = ROOT / "simulations" / "diabetes.yaml"
    out = tmp_path / "diabetes"
    # in-process (the coordinator and the real ClientApp, no Flower transport): what is checked is the example's model;
    # `fedseek simulate` itself is covered by tests/test_simulation.py
    run_in_process(scen, out, load_scenario(scen).num_sites, state_dir=tmp_path / "sites")
    data = scenario_data(load_scenario(scen))  # the scenario's own split (raw rows)
    assert data.test is not None
    pooled = r2_score(data.test.y, LinearRegression().fit(data.train.x, data.train.y).predict(data.test.x))
    summary = json.loads((out / "summary.json").read_text())
    pd.DataFrame(data.test.x, columns=FEATURES).to_csv(tmp_path / "test.csv", index=False)
    from fedseek.ops.predict import predict_table  # what `fedseek predict` runs (its CLI is tested in test_own_data.py)

    predict_table(out, tmp_path / "test.csv", tmp_path / "pred.csv")
    fed = r2_score(data.test.y, pd.read_csv(tmp_path / "pred.csv")["predicted"])
    print(f"diabetes: fedseek R² {fed:.4f} (summary {summary['final']['r2']:.4f}); pooled linear regression {pooled:.4f}")
    assert fed == pytest.approx(summary["final"]["r2"], abs=1e-4)
    assert fed >= pooled - 0.05
    assert summary["scaling"]["sites"] == 4 and summary["selection"]["metric"] == "last"
