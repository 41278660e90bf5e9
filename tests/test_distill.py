"""Federated knowledge distillation (`distill:`): the loss, the sites' side, a whole federation against a fake Grid, and bad inputs.

The student is trained by every site on its own records against the teacher's softened answers,
computed at the site; under DP the rounds are charged like any training round and the sites keep
the teacher run's ledgers. Every bad input is one line before anything starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Context, Message, RecordDict

from fedseek.config import ConfigError, load_scenario
from fedseek.train.local import DistillLoss, distill_targets, evaluate, teacher_logits, train_local
from fedseek.train.models import build_model
from fedseek.wire.records import CONFIG, refusal_reason
from tests.conftest import flower_task_identity
from tests.test_coordinator import FakeGrid, in_process_sites

pytestmark = pytest.mark.usefixtures("task_identity")


def _scenario(tmp: Path, name: str, **over: object) -> Path:
    cfg: dict = {
        "name": name, "seed": 7, "num_sites": 3, "rounds": 3,
        "data": {"dataset": "breast_cancer", "test_fraction": 0.25},
        "partition": {"scheme": "iid"},
        "model": {"kind": "mlp", "hidden": [32]},
        "strategy": {"name": "fedavg", "min_sites": 3},
        "train": {"local_epochs": 2, "lr": 0.1, "batch_size": 16, "momentum": 0.9},
        "simulation": {"node_wait_s": 5},
        "round_timeout_s": 5,
    }
    cfg.update(over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _coordinate(scen: Path, out: Path, state_dir: Path | None = None):
    from fedseek.runtime.coordinator import run_coordinator

    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(out), "state-dir": str(state_dir or ""), "resume": False}
    nodes = [1, 2, 3]
    grid = FakeGrid(nodes, in_process_sites(rc, nodes))
    return grid, run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


# ------------------------------------------------------------------ the loss
def test_distill_loss_is_alpha_ce_plus_t2_kl_per_record():
    torch.manual_seed(0)
    out, teacher = torch.randn(6, 4), torch.randn(6, 4) * 3
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    target = torch.as_tensor(distill_targets(labels.numpy(), teacher.numpy()))
    t, a = 3.0, 0.3
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(out / t, 1))).sum(1) * t * t
    ce = torch.nn.functional.cross_entropy(out, labels, reduction="none")
    per_record = DistillLoss(a, t, reduction="none")(out, target)
    assert per_record.shape == (6,) and torch.allclose(per_record, a * ce + (1 - a) * kl, atol=1e-5)
    assert torch.allclose(DistillLoss(a, t)(out, target), per_record.mean())
    assert torch.allclose(DistillLoss(1.0, t)(out, target), ce.mean())  # alpha 1: the labels alone
    assert DistillLoss(0.0, t)(teacher, target).item() == pytest.approx(0, abs=1e-5)  # alpha 0, student = teacher: no loss
    with pytest.raises(ValueError, match="alpha"):
        DistillLoss(1.5, 3.0)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_a_dp_distillation_round_costs_what_a_plain_round_costs(tmp_path, mode):
    """Per-sample clipping covers the whole per-record loss (label and teacher answer together): same charge, same steps."""
    from fedseek.config import PrivacySpec
    from fedseek.data import load_builtin
    from fedseek.privacy import DPRound, PrivacyLedger

    train, test = load_builtin("breast_cancer", 0)
    teacher = build_model("mlp", train.input_shape, 2, hidden=[64], seed=0)
    train_local(teacher, train.x, train.y, num_classes=2, epochs=5, lr=0.1, batch_size=32)
    packed = distill_targets(train.y, teacher_logits(teacher, train.x))
    spent = {}
    for label, y, distill in (("plain", train.y, None), ("distill", packed, (0.5, 3.0))):
        ledger = PrivacyLedger(tmp_path / label, accountant="rdp", delta=1e-5, epsilon_budget=50)
        dp = DPRound(PrivacySpec(noise_multiplier=1.0, grad_sample_mode=mode), ledger, 1.0, run_id="t", server_round=1)
        student = build_model("mlp", train.input_shape, 2, hidden=[4], seed=1)
        res = train_local(student, train.x, y, num_classes=2, epochs=3, lr=0.2, batch_size=64, privacy=dp, distill=distill)
        spent[label] = (res.steps, res.dp["epsilon"])
        assert evaluate(student, test.x, test.y, 2)["accuracy"] > 0.8
    assert spent["plain"] == spent["distill"]


# ------------------------------------------------------------------ a federation against the fake Grid
def test_a_student_federation_learns_from_the_teacher_and_compares_all_three_models(tmp_path):
    t_out, s_out = tmp_path / "teacher", tmp_path / "student"
    _, teacher = _coordinate(_scenario(tmp_path, "teacher"), t_out)
    assert teacher.status == "completed" and teacher.final_accuracy > 0.9
    scen = _scenario(tmp_path, "student", model={"kind": "mlp", "hidden": [2]}, distill={"teacher": "teacher", "alpha": 0.5})
    grid, summary = _coordinate(scen, s_out)
    assert summary.status == "completed" and summary.final_accuracy > 0.85
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    cfg = json.loads(str(train[0].content.config_records[CONFIG]["distill"]))
    assert cfg == {"teacher": {"kind": "mlp", "hidden": [32], "width": 16, "input_shape": [30], "num_classes": 2,
                               "task": "classification"}, "temperature": 3.0, "alpha": 0.5}
    sent = {k: v.numpy() for k, v in train[0].content.array_records["teacher"].items()}
    kept = torch.load(t_out / "model.pt", weights_only=True)
    assert set(sent) == set(kept) and all(np.array_equal(sent[k], kept[k].numpy()) for k in kept)
    assert summary.bytes_down > sum(v.nbytes for v in sent.values()) * len(train)  # the teacher's bytes are counted
    d = summary.distillation
    assert d is not None and d.teacher_run == str(t_out) and d.teacher_model == "mlp hidden [32]" and d.teacher_parameters == 1058
    names = [m.model for m in d.models]
    assert names == ["teacher", "student", "student INT8 (dynamic)"]
    teacher_row, student_row, int8_row = d.models
    assert teacher_row.accuracy == pytest.approx(teacher.final_accuracy)  # the same central test set
    assert student_row.accuracy == pytest.approx(summary.final_accuracy) and student_row.parameters == 68
    # (a 68-weight student's INT8 file is larger than its fp32 one: the per-layer quantization entries outweigh the weights)
    assert int8_row.bytes > 0 and int8_row.precision == "int8" and abs(int8_row.accuracy - student_row.accuracy) <= 0.02
    card = json.loads((s_out / "model.json").read_text())
    assert card["teacher"]["run"] == str(t_out) and card["teacher"]["accuracy"] == teacher_row.accuracy and card["parameters"] == 68
    from fedseek.outputs.report import write_report

    page = write_report(s_out).read_text()
    assert "Teacher and student (distillation)" in page and "student INT8 (dynamic)" in page
    # the replies carry the update and its metrics, nothing about the teacher's answers
    # (the fake Grid keeps only what the coordinator sent; the replies are the sites' ordinary records)
    reply = in_process_sites({"config-path": str(scen), "config-kind": "scenario", "out-dir": str(s_out), "state-dir": "",
                              "resume": False}, [1])(1, train[0])
    assert set(reply.content.array_records) == {"update"}


def test_under_dp_the_students_rounds_spend_from_the_teachers_ledgers(tmp_path):
    from fedseek.privacy import PrivacyLedger

    privacy = {"epsilon_budget": 4.0, "delta": 1e-3, "planning_rounds": 4, "max_grad_norm": 1.0}
    t_out, s_out = tmp_path / "teacher", tmp_path / "student"
    _, teacher = _coordinate(_scenario(tmp_path, "teacher", rounds=2, privacy=privacy), t_out)
    assert teacher.rounds_completed == 2
    after_teacher = [PrivacyLedger(t_out / "sites" / f"site-{i:03d}", accountant="prv", delta=1e-3, epsilon_budget=4.0).epsilon()
                     for i in range(3)]
    scen = _scenario(tmp_path, "student", rounds=3, privacy=privacy, model={"kind": "mlp", "hidden": [4]},
                     distill={"teacher": str(t_out)})
    _, summary = _coordinate(scen, s_out, state_dir=t_out / "sites")  # what `fedseek simulate` passes by default under DP
    for i in range(3):
        led = PrivacyLedger(t_out / "sites" / f"site-{i:03d}", accountant="prv", delta=1e-3, epsilon_budget=4.0)
        assert [r.server_round for r in led.rounds] == [1, 2, 1, 2, 3]  # the teacher's two rounds, then the student's three
        assert after_teacher[i] < led.epsilon() <= 4.0 + 1e-9
        # the planning horizon (4 rounds) is shared: past it, the noise rises so the last round fits what is left
        assert led.rounds[-1].noise_multiplier > led.rounds[0].noise_multiplier
    assert summary.rounds_completed == 3
    assert summary.privacy.max_epsilon is not None and summary.privacy.max_epsilon <= 4.0 + 1e-9


# ------------------------------------------------------------------ a site's side
def test_a_site_refuses_a_distillation_round_without_a_usable_teacher(tmp_path):
    t_out = tmp_path / "teacher"
    _coordinate(_scenario(tmp_path, "teacher", rounds=1), t_out)
    scen = _scenario(tmp_path, "student", rounds=1, model={"kind": "mlp", "hidden": [2]}, distill={"teacher": str(t_out)})
    grid, _ = _coordinate(scen, tmp_path / "student")
    msg = next(m for m in grid.sent if m.metadata.message_type == "train")
    rc = {"config-path": str(scen), "config-kind": "scenario", "out-dir": str(tmp_path / "s2"), "state-dir": "", "resume": False}
    site = in_process_sites(rc, [1])
    no_teacher = Message(RecordDict({k: v for k, v in msg.content.items() if k != "teacher"}), dst_node_id=1, message_type="train")
    assert "carries no teacher weights" in refusal_reason(site(1, no_teacher).content)
    wrong = Message(RecordDict(dict(msg.content.items())), dst_node_id=1, message_type="train")
    arrays = wrong.content.array_records["teacher"]
    first = next(iter(arrays))
    from flwr.app import Array

    arrays[first] = Array(np.zeros((3, 3), dtype=np.float32))
    assert "do not fit its architecture" in refusal_reason(site(1, wrong).content)


# ------------------------------------------------------------------ bad inputs: one line, before anything starts
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    out = tmp / "teacher"
    with flower_task_identity():
        _coordinate(_scenario(tmp, "teacher", rounds=1), out)
    return out


@pytest.mark.parametrize(("change", "message"), [
    ({"distill": {"teacher": "nowhere"}}, "not a directory"),
    ({"model": {"kind": "mlp", "hidden": [64]}}, "a student must be smaller than its teacher"),
    ({"data": {"dataset": "digits"}}, "the teacher reads inputs of shape [30], this run's data has [1, 8, 8]"),
    ({"distill": {"teacher": "INT8"}}, "its model is int8; distil from the fp32 run"),
    ({"distill": {"teacher": "EMPTY"}}, "model.json: not found"),
])
def test_bad_teachers_and_students_are_one_line_before_anything_starts(tmp_path, teacher_run, change, message):
    from fedseek.ops.simulate import simulate

    (tmp_path / "EMPTY").mkdir()
    shutil.copytree(teacher_run, tmp_path / "INT8")
    card = json.loads((tmp_path / "INT8" / "model.json").read_text())
    (tmp_path / "INT8" / "model.json").write_text(json.dumps({**card, "precision": "int8"}))
    over: dict = {"model": {"kind": "mlp", "hidden": [2]}, "distill": {"teacher": str(teacher_run)}}
    over.update(change)
    scen = _scenario(tmp_path, "student", **over)
    with pytest.raises(ConfigError) as err:
        simulate(scen, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_distillation_of_a_regression_is_refused_at_load(tmp_path):
    scen = _scenario(tmp_path, "reg", distill={"teacher": "t"})
    raw = yaml.safe_load(scen.read_text())
    raw["data"] = {"table": str(Path(__file__).resolve().parent.parent / "simulations" / "data" / "diabetes.csv"),
                   "label_column": "progression", "task": "regression"}
    scen.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="distill: knowledge distillation softens class answers"):
        load_scenario(scen)


def test_a_teacher_architecture_beyond_the_bounds_is_rejected_before_anything_is_built():
    """A hostile coordinator cannot make a site allocate an enormous teacher: the round config's architecture is bounded."""
    from fedseek.wire.records import DistillMeta

    with pytest.raises(ValueError, match="less than or equal to 65536"):
        DistillMeta.model_validate({"teacher": {"kind": "mlp", "hidden": [10**9], "input_shape": [30], "num_classes": 2},
                                    "temperature": 3.0, "alpha": 0.5})
    with pytest.raises(ValueError, match="at most 64 items"):
        DistillMeta.model_validate({"teacher": {"kind": "mlp", "hidden": [8] * 1000, "input_shape": [30], "num_classes": 2},
                                    "temperature": 3.0, "alpha": 0.5})
