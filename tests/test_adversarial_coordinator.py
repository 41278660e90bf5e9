"""A malicious coordinator against the real ClientApp (clients/app.py): every attack from the privacy audit.

The "coordinator" here is the test: it builds TRAIN / EVALUATE messages by hand with whatever
seed, config and weights it likes, sends them to a DP site in this process and reads every
byte of the replies. Each attack must be refused or learn nothing beyond the accounted release.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedseek.privacy import PrivacyLedger, epsilon_for
from fedseek.runtime.site_runtime import resolve_site
from fedseek.train.models import build_model
from fedseek.wire import release
from fedseek.wire.records import CONFIG, METRICS, EvalConfig, EvalMetrics, ModelMeta, RoundConfig, refusal_reason
from fedseek.wire.transfer import pack_global

META = ModelMeta(kind="mlp", hidden=[8], input_shape=[30], num_classes=2)


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


def _site(tmp: Path, **privacy) -> Context:
    """One DP site: partition 0 of breast cancer (3 sites), 20% held out, its state under tmp/sites."""
    cfg = {
        "name": "adv", "seed": 7, "num_sites": 3, "rounds": 10,
        "data": {"dataset": "breast_cancer", "test_fraction": 0.25}, "partition": {"scheme": "iid"},
        "model": {"kind": "mlp", "hidden": [8]}, "strategy": {"name": "fedavg", "min_sites": 1},
        "evaluation": {"every": 1, "holdout_fraction": 0.2},
        "privacy": {"epsilon_budget": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "planning_rounds": 10, **privacy},
    }
    (tmp / "scenario.yaml").write_text(yaml.safe_dump(cfg))
    rc = {"config-path": str(tmp / "scenario.yaml"), "config-kind": "scenario", "out-dir": str(tmp / "out"), "state-dir": "",
          "resume": False}
    return Context(run_id=1, node_id=11, node_config={"partition-id": 0}, state=RecordDict(), run_config=rc)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    m = build_model(META.kind, tuple(META.input_shape), META.num_classes, META.hidden, seed=seed)
    return {k: v.detach().numpy().astype(np.float32) for k, v in m.state_dict().items()}


def _train_msg(rnd: int = 1, arrays: dict[str, np.ndarray] | None = None, **over) -> Message:
    cfg = {"server_round": rnd, "num_rounds": 10, "lr": 0.1, "local_epochs": 1, "batch_size": 16, "model": META, "seed": 42,
           "run_id": "evil", **over}
    records, _ = pack_global(arrays or _arrays(), None, "none")
    return Message(RecordDict({**records, CONFIG: RoundConfig(**cfg).to_record()}), dst_node_id=11, message_type=MessageType.TRAIN)


def _eval_msg(rnd: int, arrays: dict[str, np.ndarray] | None = None) -> Message:
    records, _ = pack_global(arrays or _arrays(), None, "none")
    cfg = EvalConfig(server_round=rnd, model=META, run_id="evil").to_record()
    return Message(RecordDict({**records, CONFIG: cfg}), dst_node_id=11, message_type=MessageType.EVALUATE)


def _send(msg: Message, ctx: Context) -> Message:
    from clients.app import app

    return app(msg, ctx)


def _ledger(ctx: Context, kind: str = "training") -> PrivacyLedger:
    site = resolve_site(ctx)
    assert site.privacy is not None
    budget = site.privacy.epsilon_budget if kind == "training" else site.privacy.evaluation.epsilon_budget
    return PrivacyLedger(site.state_dir, accountant="prv", delta=1e-5, epsilon_budget=budget, kind=kind)


def test_loss_probing_learns_nothing_unaccounted(tmp_path):
    """lr 1e-12 made the reply's train-loss a pure, unnoised function of the records: under DP no such field is sent."""
    ctx = _site(tmp_path)
    reply = _send(_train_msg(lr=1e-12), ctx)
    assert refusal_reason(reply.content) is None
    metrics = dict(reply.content.metric_records[METRICS])
    assert "train-loss" not in metrics
    fields = {k.replace("-", "_") for k in metrics}
    assert all(release.TRAIN_REPLY[f][0] in ("dp", "public") for f in fields)  # every released field is DP or public


def test_num_rounds_one_does_not_spend_the_lifetime_budget(tmp_path):
    """The coordinator's num-rounds no longer drives calibration: the site plans over its own horizon."""
    ctx = _site(tmp_path)
    eps_one = _send(_train_msg(num_rounds=1), ctx).content.metric_records[METRICS]["epsilon"]
    (tmp_path / "b").mkdir()
    ctx2 = _site(tmp_path / "b")
    eps_ten = _send(_train_msg(num_rounds=10), ctx2).content.metric_records[METRICS]["epsilon"]
    # Same spend whatever num-rounds says (the two sites' secret holdouts differ a little in size, hence not exact).
    assert float(eps_one) == pytest.approx(float(eps_ten), rel=0.05)
    assert float(eps_one) < 0.6 * 3.0  # one round of ten planned, far below the budget of 3


def test_per_round_cap_bounds_one_round(tmp_path):
    ctx = _site(tmp_path, planning_rounds=1, max_epsilon_per_round=0.5)
    eps = float(_send(_train_msg(), ctx).content.metric_records[METRICS]["epsilon"])
    assert eps <= 0.5 + 1e-6 and eps > 0.3  # planning_rounds 1 would spend ~3; the cap raised the noise


@pytest.mark.parametrize(
    ("over", "needle"),
    [({"weighting": "balanced"}, "weighting"), ({"local_epochs": 500}, "max_local_epochs"), ({"batch_size": 100000}, "max_batch_size")],
)
def test_recipe_outside_the_site_policy_is_refused_before_training(tmp_path, over, needle):
    ctx = _site(tmp_path)
    reason = refusal_reason(_send(_train_msg(**over), ctx).content)
    assert reason is not None and needle in reason
    assert _ledger(ctx).steps() == 0  # nothing was charged, nothing trained


def test_concurrent_rounds_never_undercount(tmp_path):
    """Two train messages at once: each round that trains is charged; the ledger recomputes to what it says."""
    ctx = _site(tmp_path)
    _send(_train_msg(1), ctx)  # warm imports so both threads race on training, not on torch import
    barrier, replies = threading.Barrier(2), []

    def go(rnd: int) -> None:
        barrier.wait()
        replies.append(_send(_train_msg(rnd), ctx))

    threads = [threading.Thread(target=go, args=(r,)) for r in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    trained = 1 + sum(refusal_reason(r.content) is None for r in replies)
    ledger = _ledger(ctx)
    assert ledger.rounds_charged() == trained
    assert ledger.epsilon() == pytest.approx(epsilon_for(ledger.history, 1e-5, "prv"))
    for r in replies:
        reason = refusal_reason(r.content)
        assert reason is None or "in progress" in reason


def test_a_round_while_the_ledger_is_locked_is_refused(tmp_path):
    ctx = _site(tmp_path)
    _send(_train_msg(1), ctx)
    with _ledger(ctx).lock():
        reason = refusal_reason(_send(_train_msg(2), ctx).content)
    assert reason is not None and "in progress" in reason
    assert _ledger(ctx).rounds_charged() == 1


@pytest.mark.parametrize("damage", ["delete", "edit", "truncate"])
def test_a_damaged_ledger_refuses_to_train(tmp_path, damage):
    ctx = _site(tmp_path)
    assert refusal_reason(_send(_train_msg(1), ctx).content) is None
    assert refusal_reason(_send(_train_msg(2), ctx).content) is None
    path = resolve_site(ctx).state_dir / "privacy_ledger.json"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        raw = json.loads(path.read_text())
        _shrink_first_charge(raw)
        path.write_text(json.dumps(raw))
    reason = refusal_reason(_send(_train_msg(3), ctx).content)
    assert reason is not None and "\n" not in reason and "ledger" in reason


def _shrink_first_charge(raw: dict) -> None:
    """Hand-edit: halve the steps of the first charge entry, wherever the ledger keeps its entries."""
    for key in ("entries", "chain", "history", "rounds"):
        for entry in raw.get(key, []):
            if isinstance(entry, dict) and "steps" in entry:
                entry["steps"] = max(1, int(entry["steps"]) // 2)
                return
    raise AssertionError(f"no charge entry with steps in ledger keys {sorted(raw)}")


def test_evaluation_probing_is_noised_charged_and_stops_at_the_budget(tmp_path):
    """35 crafted models recovered a feature to float precision; now every answer is noisy, charged, and refused past the budget."""
    ctx = _site(tmp_path, evaluation={"epsilon_budget": 1.0, "planning_releases": 3})
    answers, refused = [], 0
    for i in range(8):
        reply = _send(_eval_msg(i + 1, _arrays(seed=1)), ctx)  # the same model each time: differences are pure noise
        if refusal_reason(reply.content) is not None:
            refused += 1
            continue
        answers.append(EvalMetrics.from_record(reply.content.metric_records[METRICS]))
    assert answers and refused >= 8 - 4  # ~3 planned releases fit the budget, the rest are refused
    assert all(a.noise_std > 1.0 for a in answers)
    assert len({a.class_correct[0] for a in answers}) == len(answers)  # identical queries, different (noisy) answers
    ledger = _ledger(ctx, "evaluation")
    assert ledger.rounds_charged() == len(answers) and ledger.epsilon() <= 1.0 + 1e-9
    assert _ledger(ctx).steps() == 0  # evaluation never touches the training ledger
    site = resolve_site(ctx)
    assert site.y_eval is not None and answers[0].num_examples == len(site.y_eval)  # held-out records only


def test_evaluation_never_sees_training_records(tmp_path):
    ctx = _site(tmp_path)
    site = resolve_site(ctx)
    assert site.x_eval is not None and len(site.x_eval) > 0
    train_rows = {r.tobytes() for r in site.x}
    assert not any(r.tobytes() in train_rows for r in site.x_eval)


def test_site_without_holdout_refuses_evaluation(tmp_path):
    ctx = _site(tmp_path)
    cfg = yaml.safe_load((tmp_path / "scenario.yaml").read_text())
    cfg["evaluation"] = {"every": 0}
    (tmp_path / "scenario.yaml").write_text(yaml.safe_dump(cfg))
    reason = refusal_reason(_send(_eval_msg(1), ctx).content)
    assert reason is not None and "held-out" in reason


def test_unknown_message_config_is_rejected_not_obeyed(tmp_path):
    ctx = _site(tmp_path)
    msg = _train_msg()
    msg.content.config_records[CONFIG] = ConfigRecord({"server-round": 1})  # missing keys: the site errors, trains nothing
    with pytest.raises(Exception, match="round config"):
        _send(msg, ctx)
    assert _ledger(ctx).steps() == 0
