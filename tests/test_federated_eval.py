"""Federated evaluation at the coordinator: validation and pooling of the sites' held-out counts, and the loop around it.

Sites are scripted in-process replies on a fake Grid (as tests/test_coordinator.py does): TRAIN
answers a zero update, EVALUATE answers `EvalMetrics(...).to_record()` or a refusal, so these
tests do not depend on the site's handler; one contract test runs the real ClientApp.
"""

from __future__ import annotations

import itertools
import json
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from fedseek.outputs.prometheus import PrometheusMetrics
from fedseek.outputs.report import write_report
from fedseek.outputs.schema import FederatedEvalRow, MetricsRow, SiteEval, read_rows, read_summary
from fedseek.runtime.bookkeeping import FederatedBook
from fedseek.runtime.coordinator import run_coordinator
from fedseek.runtime.federated_eval import check_reply, due, pool, ratio
from fedseek.wire.codec import CodecSpec, encode
from fedseek.wire.records import (
    CONFIG,
    METRICS,
    SITE,
    EvalConfig,
    EvalMetrics,
    RefusalMetrics,
    TrainMetrics,
    refusal_content,
    site_record,
)
from fedseek.wire.transfer import from_record, update_records

Responder = Callable[[int, Message], Message | None]


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


class FakeGrid:
    """A Grid whose nodes answer in-process; `respond` returning None means the node never answers."""

    def __init__(self, nodes: list[int], respond: Responder) -> None:
        self.nodes, self.respond = nodes, respond
        self.ids = itertools.count(1)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m-{next(self.ids)}"  # as Grid.push_messages sets it
            self.sent.append(m)
            r = self.respond(int(m.metadata.dst_node_id), m)
            if r is not None:
                replies.append(r)
        return replies


def _metrics(counts, correct, loss_sum, *, n=None, clip=5.0, std=0.0, **extra) -> EvalMetrics:
    n = int(round(sum(counts))) if n is None else n
    return EvalMetrics(num_examples=n, class_counts=[float(c) for c in counts], class_correct=[float(c) for c in correct],
                       loss_sum=float(loss_sum), loss_clip=clip, noise_std=std, **extra)


# ---------------------------------------------------------------------------- pooling arithmetic
def test_pooling_exact_counts_by_hand():
    a = _metrics([10, 30], [8, 24], 12.0)  # site A: 32 / 40 correct
    b = _metrics([20, 40], [10, 36], 30.0)  # site B: 46 / 60 correct
    p = pool([a, b])
    assert p.count == 100 and p.num_examples == 100 and not p.noisy
    assert p.accuracy == pytest.approx(0.78)  # (8 + 24 + 10 + 36) / 100
    assert p.balanced_accuracy == pytest.approx((18 / 30 + 60 / 70) / 2)
    assert p.loss == pytest.approx(0.42)  # (12 + 30) / 100
    assert p.accuracy_std == 0 and p.balanced_accuracy_std == 0 and p.loss_std == 0


def test_pooling_noise_std_propagates_by_the_delta_method():
    a = _metrics([10, 30], [8, 24], 12.0, n=40, std=2.0)
    b = _metrics([20, 40], [10, 36], 30.0, n=60, std=1.0)
    p = pool([a, b])
    assert p.noisy and p.accuracy == pytest.approx(0.78)
    var_counts = 2 * 2.0**2 + 2 * 1.0**2  # two classes per site, each count noised
    assert p.accuracy_std == pytest.approx(math.sqrt(var_counts * (1 + 0.78**2)) / 100)
    var_class = 2.0**2 + 1.0**2
    s0 = math.sqrt(var_class * (1 + 0.6**2)) / 30
    s1 = math.sqrt(var_class * (1 + (60 / 70) ** 2)) / 70
    assert p.balanced_accuracy_std == pytest.approx(math.sqrt(s0**2 + s1**2) / 2)
    var_loss = (2.0 * 5.0) ** 2 + (1.0 * 5.0) ** 2  # the loss sum's noise std is noise_std * loss_clip
    assert p.loss_std == pytest.approx(math.sqrt(var_loss + 0.42**2 * var_counts) / 100)


def test_estimates_are_clipped_and_empty_classes_skipped():
    noisy = _metrics([5.0, -1.5], [7.2, 0.3], -3.0, n=4, std=1.0)  # noise pushed correct above count, a count below 0
    p = pool([noisy])
    assert p.accuracy == 1.0 and p.loss == 0.0  # 7.5 / 3.5 clipped to 1, a negative loss sum clipped to 0
    assert p.balanced_accuracy == 1.0  # class 1 (pooled count <= 0) is skipped, class 0 clipped to 1
    assert ratio(1.0, 0.0, 1.0, 1.0) == (None, None)
    assert pool([_metrics([-2.0, -1.0], [0.5, 0.1], 0.0, n=0, std=1.0)]).accuracy is None
    assert pool([]).accuracy is None
    high = pool([_metrics([10, 10], [5, 5], 300.0, n=20, clip=5.0, std=3.0)])
    assert high.loss == 5.0  # a mean loss above the clip is clipped to loss_clip


def test_due_every_k_rounds_and_after_the_last_once():
    assert [r for r in range(1, 6) if due(r, 2, 5)] == [2, 4, 5]
    assert [r for r in range(1, 5) if due(r, 2, 4)] == [2, 4]
    assert not any(due(r, 0, 5) for r in range(1, 6))


# ---------------------------------------------------------------------------- validation
def _content(rec: MetricRecord) -> RecordDict:
    return RecordDict({METRICS: rec, SITE: site_record("x")})


def _wire(m: EvalMetrics, **over) -> MetricRecord:
    d = dict(m.to_record())
    d.update(over)
    return MetricRecord({k: v for k, v in d.items() if v is not None})


GOOD = _metrics([10, 30], [8, 24], 12.0)


@pytest.mark.parametrize("rec, reason", [
    (_wire(GOOD, **{"class-correct": [1.0, 2.0, 3.0]}), "length differs"),
    (_wire(GOOD, **{"loss-sum": float("nan")}), "'loss-sum'"),
    (_wire(GOOD, **{"class-counts": [float("nan"), 30.0]}), "'class-counts"),
    (_wire(GOOD, **{"loss-clip": None}), "'loss-clip'"),  # missing key
    (_wire(GOOD, **{"class-counts": [10.0, 20.0, 10.0], "class-correct": [1.0, 1.0, 1.0]}), "3 classes, the model has 2"),
    (_wire(GOOD, **{"class-correct": [11.0, 24.0]}), "above the class count"),
    (_wire(GOOD, **{"num-examples": 50}), "not the held-out size"),
    (_wire(GOOD, **{"loss-sum": 1e6}), "loss sum"),
    (_wire(_metrics([10, 30], [8, 24], 12.0, std=1.0), **{"class-counts": [1e9, 30.0]}), "beyond the noise"),
])
def test_malformed_replies_are_rejected_with_a_reason(rec, reason):
    problem, metrics = check_reply(_content(rec), num_classes=2)
    assert metrics is None and reason in problem


def test_reply_without_metrics_is_rejected_and_a_good_one_accepted():
    assert check_reply(RecordDict({SITE: site_record("x")}), 2) == ("no 'metrics' record in evaluation reply", None)
    assert check_reply(_content(GOOD.to_record()), 2) == ("", GOOD)


# ---------------------------------------------------------------------------- the loop
def _scenario(tmp: Path, **over) -> Path:
    cfg = {
        "name": "fedeval", "seed": 7, "num_sites": 3, "rounds": 5,
        "data": {"dataset": "breast_cancer", "test_fraction": 0.25},
        "partition": {"scheme": "iid"},
        "model": {"kind": "mlp", "hidden": [8]},
        "strategy": {"name": "fedavg", "min_sites": 3},
        "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 32},
        "simulation": {"node_wait_s": 5},
        "round_timeout_s": 5,
        "evaluation": {"every": 2},
    }
    cfg.update(over)
    path = tmp / "scenario.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(tmp: Path, grid: FakeGrid, **over):
    rc = {"config-path": str(_scenario(tmp, **over)), "config-kind": "scenario", "out-dir": str(tmp / "out"), "state-dir": "",
          "resume": False}
    return run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


def _zero_update(node: int, msg: Message) -> Message:
    delta = {k: np.zeros_like(v) for k, v in from_record(msg.content.array_records["global"]).items()}
    content = RecordDict({**update_records(encode(delta, CodecSpec())), METRICS: TrainMetrics(num_examples=50).to_record(),
                          SITE: site_record(f"site-{node}")})
    return Message(content=content, reply_to=msg)


def scripted(evaluate: Callable[[int, Message], Message | None]) -> Responder:
    """QUERY: the node's name ("site-N"); TRAIN: a zero update; EVALUATE: whatever `evaluate` scripts."""

    def respond(node: int, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return Message(RecordDict({SITE: site_record(f"site-{node}")}), reply_to=msg)
        if kind == MessageType.TRAIN:
            return _zero_update(node, msg)
        return evaluate(node, msg)

    return respond


EVAL_ANSWERS = {1: _metrics([10, 30], [8, 24], 12.0, n=40, std=2.0, epsilon=0.5, delta=1e-5, epsilon_budget=3.0),
                2: _metrics([20, 40], [10, 36], 30.0, n=60, std=1.0, epsilon=0.4, delta=1e-5, epsilon_budget=3.0)}


def _eval_reply(node: int, msg: Message, calls: list[tuple[int, int]]) -> Message | None:
    rnd = EvalConfig.from_record(msg.content.config_records[CONFIG]).server_round
    calls.append((rnd, node))
    if node in EVAL_ANSWERS:  # honest (DP-noised) answers, named or not (a reply naming another site: tests/test_identity.py)
        return Message(RecordDict({METRICS: EVAL_ANSWERS[node].to_record(), SITE: site_record("site-2" if node == 2 else "")}),
                       reply_to=msg)
    if node == 3:  # malformed in round 2 (NaN), then an exact, well-formed answer
        if rnd == 2:
            return Message(RecordDict({METRICS: _wire(GOOD, **{"loss-sum": float("nan")}), SITE: site_record("site-3")}), reply_to=msg)
        return Message(RecordDict({METRICS: GOOD.to_record(), SITE: site_record("site-3")}), reply_to=msg)
    if node == 4:  # refuses (evaluation budget spent): never asked again
        return Message(refusal_content("evaluation budget spent", RefusalMetrics(epsilon=2.9, epsilon_budget=3.0), "site-4"),
                       reply_to=msg)
    if node == 5:
        return Message(Error(code=2, reason="ClientApp raised boom"), reply_to=msg)
    return None  # node 6 never answers an evaluation


def test_federated_evaluation_every_two_rounds_over_five(tmp_path):
    calls: list[tuple[int, int]] = []
    nodes = [1, 2, 3, 4, 5, 6]
    grid = FakeGrid(nodes, scripted(lambda n, m: _eval_reply(n, m, calls)))
    summary = _run(tmp_path, grid, num_sites=6, strategy={"name": "fedavg", "min_sites": 6})
    out = tmp_path / "out"
    rows = read_rows(out / "metrics.jsonl")
    assert [r.round for r in rows if r.federated is not None] == [2, 4, 5]
    assert sorted({rnd for rnd, _ in calls}) == [2, 4, 5]
    assert [n for rnd, n in calls if rnd == 2] == [1, 2, 3, 4, 5, 6] and 4 not in [n for rnd, n in calls if rnd > 2]

    r2, r4 = rows[1].federated, rows[3].federated
    assert r2 is not None and r4 is not None
    assert (r2.sampled, r2.evaluated, r2.refused, r2.rejected, r2.failed, r2.timed_out) == (6, 2, 1, 1, 1, 1)
    assert set(r2.sites) == {f"site-{n}" for n in nodes}  # names from the node tracker
    assert "'loss-sum'" in r2.sites["site-3"].reason and r2.sites["site-4"].reason == "evaluation budget spent"
    assert r2.sites["site-4"].epsilon == 2.9 and "boom" in r2.sites["site-5"].reason and r2.sites["site-6"].status == "timed_out"
    assert r2.accuracy == pytest.approx(0.78) and r2.noisy and r2.sites["site-1"].noise_std == 2.0
    assert r2.sites["site-1"].accuracy == pytest.approx(0.8) and r2.sites["site-1"].count == 40
    assert (r4.sampled, r4.evaluated, r4.rejected) == (5, 3, 0)  # the refusing site is not asked again
    assert r4.accuracy == pytest.approx((78 + 32) / 140) and r4.num_examples == 140

    fed = summary.federated_evaluation
    assert fed is not None and fed == read_summary(out / "summary.json").federated_evaluation
    assert fed.every == 2 and fed.rounds == [2, 4, 5] and fed.last is not None and fed.last.round == 5
    assert fed.sites["site-1"].epsilon == 0.5 and fed.sites["site-1"].evaluations == 3 and fed.max_epsilon == 2.9
    assert fed.sites["site-4"].refusals == 1 and fed.sites["site-4"].excluded == "evaluation budget spent"
    assert fed.sites["site-3"].rejections == 1 and fed.sites["site-3"].evaluations == 2

    raw = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert raw["schema_version"] == 1 and raw["federated"]["sites"]["site-1"]["epsilon"] == 0.5
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    kinds = [(e["event"], e.get("site"), e.get("round")) for e in events if e["event"].startswith("evaluation_")]
    assert ("evaluation_refused", "site-4", 2) in kinds and ("evaluation_rejected", "site-3", 2) in kinds
    assert ("evaluation_failed", "site-5", 2) in kinds and ("evaluation_timed_out", "site-6", 4) in kinds

    page = write_report(out).read_text()
    assert 'id="federated"' in page and "DP-noised estimates" in page and "0.7800 ± " in page and "site-4" in page


def test_evaluate_messages_carry_the_global_model_and_the_config(tmp_path):
    grid = FakeGrid([1, 2], scripted(lambda n, m: Message(RecordDict({METRICS: EVAL_ANSWERS[n].to_record()}), reply_to=m)))
    _run(tmp_path, grid, num_sites=2, rounds=1, strategy={"name": "fedavg", "min_sites": 2}, evaluation={"every": 3})
    evals = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert sorted(int(m.metadata.dst_node_id) for m in evals) == [1, 2]  # after the last round even though 1 % 3 != 0
    cfg = EvalConfig.from_record(evals[0].content.config_records[CONFIG])
    assert cfg.server_round == 1 and cfg.model.num_classes == 2 and cfg.run_id == "1"
    train = next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    assert set(evals[0].content.array_records) == set(train.content.array_records) == {"global"}


def test_evaluation_off_sends_nothing_and_writes_no_fields(tmp_path):
    grid = FakeGrid([1, 2], scripted(lambda n, m: pytest.fail("no EVALUATE message when evaluation.every is 0")))
    summary = _run(tmp_path, grid, num_sites=2, rounds=2, strategy={"name": "fedavg", "min_sites": 2}, evaluation={"every": 0})
    assert summary.federated_evaluation is None
    assert all(r.federated is None for r in read_rows(tmp_path / "out" / "metrics.jsonl"))
    assert 'id="federated"' not in write_report(tmp_path / "out").read_text()


def test_real_site_handler_answers_exact_counts(tmp_path):
    """Contract check with the site's own handler (non-DP): the reply pools into exact held-out estimates."""
    from flwr.common.constant import ErrorCode

    from clients.app import app

    nodes = [1, 2, 3]
    rc = {"config-path": str(_scenario(tmp_path, rounds=1, evaluation={"every": 1})), "config-kind": "scenario",
          "out-dir": str(tmp_path / "out"), "state-dir": "", "resume": False}
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(), run_config=rc)
                for i, n in enumerate(nodes)}

    def respond(node: int, msg: Message) -> Message:
        try:
            return app(msg, contexts[node])
        except Exception as exc:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    summary = run_coordinator(FakeGrid(nodes, respond), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    last = summary.federated_evaluation.last if summary.federated_evaluation else None
    assert last is not None and last.evaluated == 3, last and {k: v.reason for k, v in last.sites.items()}
    assert not last.noisy and last.accuracy_std == 0 and 0.0 <= (last.accuracy or -1) <= 1.0
    assert last.num_examples > 0 and last.count == last.num_examples


# ---------------------------------------------------------------------------- book, schema, Prometheus
def _fed_row(rnd: int, **sites: SiteEval) -> FederatedEvalRow:
    return FederatedEvalRow(round=rnd, accuracy=0.8, accuracy_std=0.01, noisy=True, sites=sites)


def test_book_round_trips_and_old_checkpoints_load():
    from fedseek.runtime.bookkeeping import RunBook

    book = FederatedBook()
    book.record(_fed_row(2, a=SiteEval(status="evaluated", accuracy=0.7, epsilon=0.3), b=SiteEval(status="refused", reason="spent")))
    book.record(_fed_row(4, a=SiteEval(status="evaluated", accuracy=0.75, epsilon=0.6)))
    again = FederatedBook()
    again.load_state_dict(json.loads(json.dumps(book.state_dict())))
    assert again.summary(2) == book.summary(2) and again.excluded() == {"b": "spent"}
    s = book.summary(2)
    assert s is not None and s.sites["a"].epsilon == 0.6 and s.sites["a"].last_accuracy == 0.75 and s.rounds == [2, 4]
    assert book.summary(0) is None
    old = RunBook().state_dict()
    del old["federated"]  # a checkpoint written before federated evaluation
    RunBook().load_state_dict(old)


def test_old_rows_read_without_the_field_and_prometheus_shows_it():
    old = MetricsRow.model_validate({"schema_version": 1, "round": 1, "time": 1.0, "round_seconds": 1.0})
    assert old.federated is None
    row = MetricsRow(round=2, time=1.0, round_seconds=1.0, federated=_fed_row(2, a=SiteEval(status="evaluated", epsilon=0.25)))
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        prom.observe_round(row)
        body = urllib.request.urlopen(f"http://127.0.0.1:{prom.port}/metrics", timeout=5).read().decode()
    finally:
        prom.close()
    assert 'fedseek_federated_accuracy{run="fedseek"} 0.8' in body and 'fedseek_federated_accuracy_std{run="fedseek"} 0.01' in body
    assert 'fedseek_site_evaluation_epsilon{run="fedseek",site="a"} 0.25' in body


def test_unknown_or_duplicate_replies_are_ignored():
    from fedseek.runtime.federated_eval import FederatedEvaluator
    from fedseek.runtime.nodes import NodeTracker
    from fedseek.wire.records import ModelMeta

    def respond(node: int, msg: Message) -> Message | None:
        return Message(RecordDict({SITE: site_record(f"site-{node}")}), reply_to=msg)

    grid = FakeGrid([1], respond)
    nodes = NodeTracker(grid, "1", lambda *a, **k: None, node_wait_s=1, query_timeout_s=1)
    ev = FederatedEvaluator(grid, nodes, lambda *a, **k: None, meta=ModelMeta(kind="mlp", input_shape=[3], num_classes=2), run_id="1",
                            timeout_s=1)
    nodes.discover([1])
    msg = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.EVALUATE)
    msg.metadata.__dict__["_message_id"] = "e-1"
    stray = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=9, message_type=MessageType.EVALUATE)
    stray.metadata.__dict__["_message_id"] = "e-9"
    good = Message(RecordDict({METRICS: GOOD.to_record()}), reply_to=msg)
    sites, answers = ev.collect([msg], [good, Message(RecordDict({METRICS: GOOD.to_record()}), reply_to=msg),
                                        Message(RecordDict({METRICS: GOOD.to_record()}), reply_to=stray)])
    assert list(sites) == ["site-1"] and sites["site-1"].status == "evaluated" and answers == [GOOD]
