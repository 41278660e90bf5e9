"""The coordinator's round loop against a fake Grid: in-process sites (the real ClientApp) and scripted replies.

No Flower processes: the Grid hands each message to a responder in this process, as Flower's
own strategy tests do with mock replies, so these tests are fast and exercise the loop, the
strategy wrapper, screening, bookkeeping and checkpoints exactly as a run does.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from fedseek.outputs.schema import read_rows, read_summary
from fedseek.runtime.coordinator import run_coordinator
from fedseek.runtime.site import handle_query
from fedseek.wire.blob import pack_blob, unpack_blob
from fedseek.wire.records import CONFIG

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


def _scenario(tmp: Path, **over) -> Path:
    cfg = {
        "name": "unit", "seed": 7, "num_sites": 3, "rounds": 2,
        "data": {"dataset": "breast_cancer", "test_fraction": 0.25},
        "partition": {"scheme": "iid"},
        "model": {"kind": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "min_sites": 3},
        "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 32},
        "simulation": {"node_wait_s": 5},
        "round_timeout_s": 5,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = tmp / "scenario.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_config(scenario: Path, out: Path, resume: bool = False) -> dict:
    return {"config-path": str(scenario), "config-kind": "scenario", "out-dir": str(out), "state-dir": "", "resume": resume}


def _site_context(run_config: dict, node: int, pid: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": pid}, state=RecordDict(), run_config=run_config)


def in_process_sites(run_config: dict, nodes: list[int]) -> Responder:
    """Every node runs fedseek's real ClientApp (clients/app.py) in this process."""
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import message_from_proto, message_to_proto

    from clients.app import app

    contexts = {n: _site_context(run_config, n, i) for i, n in enumerate(nodes)}

    def respond(node: int, msg: Message) -> Message:
        try:  # each site gets its own copy, as through the transport (SecAgg+'s mod edits the content it receives)
            return app(message_from_proto(message_to_proto(msg)), contexts[node])
        except Exception as exc:  # as Flower's runtime does: an exception in the ClientApp becomes an error reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    return respond


def run_in_process(scenario: Path, out: Path, num_sites: int, state_dir: Path | None = None):
    """A scenario's whole run on one machine without Ray: the coordinator and the real ClientApp in this process. Same
    seed, same result as `fedseek simulate` (non-DP): the slow tier compares simulations against it instead of starting a
    second Flower/Ray run."""
    from tests.conftest import flower_task_identity

    rc = {**_run_config(scenario, out), "state-dir": str(state_dir or "")}
    nodes = list(range(1, num_sites + 1))
    with flower_task_identity():
        return _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)


def _coordinator(grid: FakeGrid, run_config: dict):
    return run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_rounds_with_in_process_sites_write_typed_outputs(tmp_path):
    scen, out = _scenario(tmp_path), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [11, 12, 13]
    grid = FakeGrid(nodes, in_process_sites(rc, nodes))
    summary = _coordinator(grid, rc)
    rows = read_rows(out / "metrics.jsonl")
    assert [r.round for r in rows] == [1, 2] and all(r.accepted == 3 and r.sampled == 3 for r in rows)
    assert summary == read_summary(out / "summary.json") and summary.rounds_completed == 2
    assert summary.final_accuracy is not None and summary.initial is not None
    assert summary.final_accuracy > summary.initial["accuracy"]  # two rounds of FedAvg beat the untrained model
    assert summary.bytes_down == sum(r.bytes_down for r in rows) > 0 and summary.bytes_up == sum(r.bytes_up for r in rows) > 0
    assert set(rows[0].sites) == {"site-000", "site-001", "site-002"}
    raw = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert raw["schema_version"] == 1 and "num-examples" in raw["sites"]["site-000"]  # the file keeps its field names
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events.count("site_joined") == 3 and events.count("checkpoint") == 2
    assert (out / "model.pt").exists() and (out / "checkpoint" / "state.pt").exists()
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_msgs) == 6 and {"global", "config"} <= set(train_msgs[0].content.keys())


def test_scripted_failures_are_named_counted_and_excluded(tmp_path):
    """Node 1 crashes, node 2 never answers, node 3 refuses (then is excluded), node 4 sends NaN, node 5 is honest."""
    scen, out = _scenario(tmp_path, num_sites=5, strategy={"min_sites": 5}), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return honest(node, msg)
        if node == 1:
            return Message(Error(code=2, reason="ClientApp raised boom"), reply_to=msg)
        if node == 2:
            return None
        reply = honest(node, msg)
        if node == 3:
            reply.content["status"] = ConfigRecord({"refused": "budget spent"})
        if node == 4:
            arrays, meta = unpack_blob(reply.content.array_records["update"]["blob"].numpy())
            bad = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
            reply.content["update"] = ArrayRecord({"blob": Array(pack_blob(bad, meta))})
        return reply

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    r1, r2 = read_rows(out / "metrics.jsonl")
    assert (r1.sampled, r1.accepted, r1.rejected, r1.refused, r1.failed, r1.timed_out) == (5, 1, 1, 1, 1, 1)
    assert r1.failures[0].site == "site-000" and "boom" in r1.failures[0].reason
    assert r1.timed_out_sites == ["site-001"]
    assert r1.refusals[0].site == "site-002" and r1.rejections[0].site == "site-003" and "non-finite" in r1.rejections[0].reason
    assert r2.sampled == 3 and r2.skipped_sites == ["site-001"]  # the refusing site is not asked again, the silent one backs off
    assert summary.excluded_sites == {"site-002": "budget spent"}
    assert summary.failed_replies == 3 and summary.rejected_updates == 2 and summary.refused_rounds == 1
    assert [r.round for r in summary.rejections] == [1, 2]


def test_every_site_excluded_stops_early_with_a_reason(tmp_path):
    scen, out = _scenario(tmp_path, rounds=3), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return honest(node, msg)
        from fedseek.wire.records import RefusalMetrics, refusal_content

        return Message(refusal_content("budget spent", RefusalMetrics(num_examples=5, epsilon=3.0), f"site-{node - 1:03d}"),
                       reply_to=msg)

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    assert summary.rounds_completed == 1 and summary.stop_reason and "every site is excluded" in summary.stop_reason
    assert summary.privacy.sites["site-000"].refusals == 1 and summary.privacy.sites["site-000"].epsilon == 3.0


def _weights(out: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(out / "model.pt").items()}


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_from_checkpoint_gives_the_same_model(tmp_path, strategy):
    """Three rounds in one go == two rounds, then a resumed run: every stateful part is in the checkpoint."""
    nodes = [1, 2, 3]
    (tmp_path / "a").mkdir()
    full = _scenario(tmp_path / "a", rounds=3, strategy={"name": strategy, "fraction_train": 0.67})
    rc = _run_config(full, tmp_path / "full")
    _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    (tmp_path / "b").mkdir()
    part = _scenario(tmp_path / "b", rounds=2, strategy={"name": strategy, "fraction_train": 0.67})
    rc2 = _run_config(part, tmp_path / "split")
    _coordinator(FakeGrid(nodes, in_process_sites(rc2, nodes)), rc2)
    full_cfg = yaml.safe_load(full.read_text())
    part.write_text(yaml.safe_dump({**full_cfg}))  # same scenario, now 3 rounds
    rc3 = _run_config(part, tmp_path / "split", resume=True)
    summary = _coordinator(FakeGrid([7, 8, 9], in_process_sites(rc3, [7, 8, 9])), rc3)
    assert summary.rounds_completed == 3
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sampled = [r.sampled for r in read_rows(tmp_path / "split" / "metrics.jsonl")]
    assert sampled == [2, 2, 2]


def test_site_answers_query_with_its_name(tmp_path):
    rc = _run_config(_scenario(tmp_path), tmp_path / "out")
    q = Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    q.metadata.__dict__["_message_id"] = "q-1"
    reply = handle_query(q, _site_context(rc, 5, 2))
    assert reply.content.config_records["site"]["name"] == "site-002"


def test_round_config_round_trips_and_rejects_bad_values():
    from fedseek.wire.records import ModelMeta, RecordError, RoundConfig

    cfg = RoundConfig(server_round=2, num_rounds=5, lr=0.1, local_epochs=1, batch_size=8,
                      model=ModelMeta(kind="mlp", hidden=[4], input_shape=[3], num_classes=2), codec={"kind": "topk"})
    rec = cfg.to_record()
    assert rec["server-round"] == 2 and isinstance(rec["model"], str)
    assert RoundConfig.from_record(rec) == cfg
    rec["lr"] = float("nan")
    with pytest.raises(RecordError, match="'lr'"):
        RoundConfig.from_record(rec)
    assert CONFIG == "config"


@pytest.mark.parametrize("attack, reason", [("nan", "non-finite"), ("scale", "above bound"), ("wrong_shape", "undecodable"),
                                            ("sign_flip", "above bound")])
def test_simulated_byzantine_site_is_rejected(tmp_path, attack, reason):
    """The faults mod (simulation only) corrupts one site's real update; screening must catch it every round."""
    from fedseek.runtime.faults import byzantine_sites

    scen = _scenario(tmp_path, faults={"byzantine": {"fraction": 0.34, "attack": attack, "scale": 1e4}},
                     validation={"max_update_norm": 100.0})
    rc, nodes = _run_config(scen, tmp_path / "out"), [1, 2, 3]
    summary = _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    (bad,) = byzantine_sites(3, 0.34, 7)
    rows = read_rows(tmp_path / "out" / "metrics.jsonl")
    assert [(r.accepted, r.rejected) for r in rows] == [(2, 1), (2, 1)]
    assert {r.rejections[0].site for r in rows} == {f"site-{bad:03d}"} and reason in rows[0].rejections[0].reason
    assert summary.rejected_updates == 2


def test_simulated_dropouts_are_error_replies(tmp_path):
    scen = _scenario(tmp_path, faults={"dropout_rate": 0.9})
    rc, nodes = _run_config(scen, tmp_path / "out"), [1, 2, 3]
    _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    rows = read_rows(tmp_path / "out" / "metrics.jsonl")
    failures = [f for r in rows for f in r.failures]
    assert failures and all("simulated drop-out" in f.reason and f.site.startswith("site-") for f in failures)
    assert sum(r.failed + r.accepted for r in rows) == 6
