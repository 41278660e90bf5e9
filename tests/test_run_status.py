"""Honest run status and bounded waiting (fake Grid, no Flower processes).

A run that accepted no update ends `failed` with a one-line reason (summary.json, report.html,
the CLI's exit code); a site that sends nothing costs a round at most one round_timeout_s and
then backs off (1, 2, 4 ... rounds); a lost SuperLink is one line, not a traceback.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from rich.console import Console

from fedseek.outputs.schema import RunSummary, read_rows, read_summary
from fedseek.runtime.coordinator import run_coordinator
from fedseek.wire.records import CONFIG, RefusalMetrics, RoundConfig, refusal_content
from tests.test_coordinator import FakeGrid, Responder, _run_config, _scenario, _task_identity, in_process_sites  # noqa: F401


def _coordinator(grid: FakeGrid, rc: dict) -> RunSummary:
    return run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def _refuse(msg: Message, node: int) -> Message:
    return Message(refusal_content("budget spent", RefusalMetrics(num_examples=5, epsilon=3.0), f"site-{node - 1:03d}"), reply_to=msg)


def test_every_site_refusing_fails_the_run_with_one_line(tmp_path):
    from fedseek.outputs.report import write_report

    scen, out = _scenario(tmp_path, rounds=3), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3]
    honest = in_process_sites(rc, nodes)
    grid = FakeGrid(nodes, lambda n, m: honest(n, m) if m.metadata.message_type == MessageType.QUERY else _refuse(m, n))
    summary = _coordinator(grid, rc)
    assert summary.status == "failed" and read_summary(out / "summary.json").status == "failed"
    assert summary.stop_reason == ("no update was accepted in 1 round(s) (3 refused); "
                                   "stopped before round 2: every site is excluded (3 out of privacy budget or refused)")
    assert ("run_finished", "failed") in [(e["event"], e.get("status")) for e in _events(out)]
    page = write_report(out).read_text()
    assert "Run failed: no update was accepted in 1 round(s)" in page and "<b>status</b> failed" in page


def test_every_reply_failing_fails_the_run_after_all_rounds(tmp_path):
    scen, out = _scenario(tmp_path), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return honest(node, msg)
        return Message(Error(code=2, reason="ClientApp raised boom"), reply_to=msg)

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    assert (summary.status, summary.rounds_completed) == ("failed", 2)
    assert summary.stop_reason == "no update was accepted in 2 round(s) (6 failed)"
    assert summary.final == summary.initial  # the untrained model: nothing was ever aggregated


def test_a_run_that_trained_then_ran_out_of_sites_is_stopped_not_completed(tmp_path):
    scen, out = _scenario(tmp_path, rounds=3), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and RoundConfig.from_record(msg.content.config_records[CONFIG]).server_round > 1:
            return _refuse(msg, node)
        return honest(node, msg)

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    assert (summary.status, summary.rounds_completed) == ("stopped", 2)
    assert summary.stop_reason is not None and summary.stop_reason.startswith("stopped before round 3: every site is excluded")


def test_completed_run_has_status_completed_and_no_reason(tmp_path):
    scen, out = _scenario(tmp_path), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3]
    summary = _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    assert (summary.status, summary.stop_reason) == ("completed", None)


class WaitingGrid(FakeGrid):
    """Like Flower's Grid, waits out the whole timeout (for real: it is short here) when some node does not answer; logs each call."""

    def __init__(self, nodes: list[int], respond: Responder) -> None:
        super().__init__(nodes, respond)
        self.calls: list[tuple[str, float, float, list[int]]] = []  # (message type, timeout given, seconds waited, destinations)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        t0 = time.monotonic()
        replies = super().send_and_receive(messages, timeout=timeout)
        if len(replies) < len(messages):
            time.sleep(timeout)
        kind = str(messages[0].metadata.message_type) if messages else ""
        self.calls.append((kind, float(timeout), time.monotonic() - t0, [int(m.metadata.dst_node_id) for m in messages]))
        return replies


def test_a_silent_site_costs_at_most_one_timeout_per_round_and_backs_off(tmp_path):
    """Node 3 never answers anything (not even the QUERY), node 4 answers the QUERY but never trains."""
    timeout = 1.0
    scen = _scenario(tmp_path, num_sites=4, rounds=6, strategy={"min_sites": 4}, round_timeout_s=timeout)
    out = tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        if node == 3 or (node == 4 and msg.metadata.message_type == MessageType.TRAIN):
            return None
        return honest(node, msg)

    grid = WaitingGrid(nodes, respond)
    summary = _coordinator(grid, rc)
    per_round: list[float] = []
    waited = 0.0
    for kind, given, spent, dsts in grid.calls:
        if kind == MessageType.QUERY:
            waited += spent
        else:
            assert kind == MessageType.TRAIN and 3 not in dsts  # a node silent to the QUERY is not also waited for in training
            per_round.append(waited + given)  # the QUERY's wait plus the time training may still wait
            waited = 0.0
    assert len(per_round) == 6 and max(per_round) <= timeout + 0.02, per_round
    rows = read_rows(out / "metrics.jsonl")
    asked = [r.round for r in rows if r.timed_out]
    assert asked == [1, 3, 6]  # back-off: skip 1, then 2 rounds (then 4)
    assert all(sorted(r.timed_out_sites) == ["node-3", "site-003"] for r in rows if r.round in asked)
    assert [sorted(r.skipped_sites) for r in rows if r.round not in asked] == [["node-3", "site-003"]] * 3
    assert all(r.accepted == 2 for r in rows) and summary.status == "completed"
    backoffs = [(e["site"], e["round"], e["skip_rounds"], e["retry_round"]) for e in _events(out) if e["event"] == "site_backoff"]
    assert sorted(backoffs) == sorted([(s, 1, 1, 3) for s in ("node-3", "site-003")] + [(s, 3, 2, 6) for s in ("node-3", "site-003")]
                                      + [(s, 6, 4, 11) for s in ("node-3", "site-003")])
    queries_to_3 = sum(3 in dsts for kind, _, _, dsts in grid.calls if kind == MessageType.QUERY)
    assert queries_to_3 == 3


def test_report_raises_one_line_unless_completed(tmp_path):
    from fedseek.ops.launcher import Outcome, report
    from fedseek.ops.simulate import SimulationError

    summary = RunSummary(name="x", run_id="7", rounds=2, rounds_completed=2, num_sites=3, strategy="fedavg", seed=1, status="failed",
                         stop_reason="no update was accepted in 2 round(s) (6 failed)")
    table = io.StringIO()
    with pytest.raises(SimulationError) as info:
        report(Console(file=table, width=200), Outcome(summary, summary.model_dump(), error=SimulationError), tmp_path, time.time())
    assert str(info.value) == f"run 7 failed: no update was accepted in 2 round(s) (6 failed) (outputs in {tmp_path})"
    assert "failed: no update was accepted" in table.getvalue()  # the table still shows what happened
    ok = summary.model_copy(update={"status": "completed", "stop_reason": None})
    assert report(Console(file=io.StringIO()), Outcome(ok, {"fine": True}), tmp_path, time.time()) == {"fine": True}


def test_a_lost_superlink_is_one_line_not_a_traceback(tmp_path):
    import httpx

    from fedseek.ops import follow
    from fedseek.ops.follow import LostSuperLink, follow_run

    class DeadClient:
        calls = 0

        def status(self, run_id: int):
            DeadClient.calls += 1
            raise httpx.ConnectError("[Errno 111] Connection refused\n(and more lines)")

    with pytest.raises(LostSuperLink) as info:
        follow_run(tmp_path, DeadClient(), 5, rounds=2, sites=2, console=Console(file=io.StringIO()), timeout_s=30)
    assert str(info.value) == "lost the SuperLink while following run 5 (ConnectError: [Errno 111] Connection refused (and more lines))"
    assert DeadClient.calls == follow.STATUS_RETRIES
