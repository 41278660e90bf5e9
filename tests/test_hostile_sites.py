"""One hostile site of three, against the real coordinator loop on the fake Grid: the run completes, the attacker is rejected or bounded.

Each mode replaces site-002's real reply (the real ClientApp trained it) with a hostile one:
a deeply nested blob header, inf / NaN / negative / 1e12 num-examples, an inflated (in-range)
num-examples, 1e30 values, a sign-flipped update scaled x10, wrong shapes. With the default
validation config the run completes, the attacker's reply is rejected (or its weight bounded)
with a reason in metrics.jsonl and audit.jsonl, the honest sites are never excluded or blamed,
and the final accuracy is within 2 points of a clean run with the same seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, RecordDict

from fedseek.outputs.schema import RunSummary, read_rows
from tests.conftest import flower_task_identity
from tests.hostile_replies import nested_json, num_examples, scaled, wrong_shapes
from tests.test_coordinator import FakeGrid, _coordinator, _run_config, _scenario, in_process_sites

NODES = [11, 12, 13]
ATTACKER, HONEST = "site-002", {"site-000", "site-001"}  # node 13 runs partition 2
ROUNDS = 3


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    """Flower Messages need the process' task identity (tests/conftest.py), for the module's shared runs."""
    with flower_task_identity():
        yield


MODES: dict[str, tuple[Callable[[RecordDict], None], str]] = {  # mode -> (generator, what the rejection reason names)
    "nested_json": (nested_json, "header"),
    "inf_examples": (num_examples(math.inf), "num-examples"),
    "nan_examples": (num_examples(math.nan), "num-examples"),
    "negative_examples": (num_examples(-100), "num-examples"),
    "huge_examples": (num_examples(1e12), "num-examples"),
    "values_1e30": (scaled(1e30, absolute=True), "above bound"),
    "sign_flip_x10": (scaled(-10.0), "above bound"),
    "wrong_shapes": (wrong_shapes, "shape"),
}


def _run(tmp: Path, mutate: Callable[[RecordDict], None] | None, **over: object) -> tuple[RunSummary, Path]:
    scen, out = _scenario(tmp, rounds=ROUNDS, **over), tmp / "out"
    rc = _run_config(scen, out)
    honest = in_process_sites(rc, NODES)

    def respond(node: int, msg: Message) -> Message | None:
        reply = honest(node, msg)
        if mutate is not None and node == NODES[2] and msg.metadata.message_type == MessageType.TRAIN:
            mutate(reply.content)
        return reply

    return _coordinator(FakeGrid(NODES, respond), rc), out


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Final accuracy of the same scenario and seed with three honest sites."""
    summary, _ = _run(tmp_path_factory.mktemp("clean"), None)
    assert summary.final_accuracy is not None
    return float(summary.final_accuracy)


@pytest.fixture(scope="module")
def clean_median_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Final accuracy of the clean run with FedMedian."""
    summary, _ = _run(tmp_path_factory.mktemp("clean-median"), None, strategy={"name": "fedmedian"})
    assert summary.final_accuracy is not None
    return float(summary.final_accuracy)


def _audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def _honest_never_blamed(rows: list, summary: RunSummary, out: Path) -> None:
    for r in rows:
        blamed = {i.site for i in [*r.rejections, *r.failures, *r.refusals, *r.bounded]}
        assert not blamed & HONEST, f"round {r.round} blames an honest site: {blamed}"
        assert {s for s, v in r.sites.items() if v.status == "trained"} >= HONEST
    assert not summary.excluded_sites
    events = {e["event"] for e in _audit(out) if e.get("site") in HONEST}
    assert events <= {"site_joined"}, events


@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_hostile_site_is_rejected_and_the_run_completes(tmp_path, mode, clean_accuracy):
    mutate, reason = MODES[mode]
    summary, out = _run(tmp_path, mutate)
    rows = read_rows(out / "metrics.jsonl")
    assert summary.rounds_completed == ROUNDS and getattr(summary, "status", "completed") == "completed"
    for r in rows:
        assert (r.accepted, r.rejected, r.model_kept) == (2, 1, None), f"round {r.round}"
        assert r.rejections[0].site == ATTACKER and reason in r.rejections[0].reason, r.rejections[0].reason
    rejected = [e for e in _audit(out) if e["event"] == "update_rejected"]
    assert [e["site"] for e in rejected] == [ATTACKER] * ROUNDS and all(reason in e["reason"] for e in rejected)
    _honest_never_blamed(rows, summary, out)
    assert summary.final_accuracy == pytest.approx(clean_accuracy, abs=0.02)


def test_inflated_num_examples_is_counted_at_the_bound(tmp_path, clean_accuracy):
    """A plausible but inflated count (10^6, below the record bound) is accepted with its weight capped at 3x the round's median."""
    summary, out = _run(tmp_path, num_examples(10**6))
    rows = read_rows(out / "metrics.jsonl")
    for r in rows:
        assert (r.accepted, r.rejected) == (3, 0) and [b.site for b in r.bounded] == [ATTACKER]
        honest_counts = sorted(r.sites[s].num_examples for s in HONEST)
        # the (lower) median of three counts is the larger honest one
        assert f"num-examples 1000000 counted as {3 * honest_counts[-1]}" in r.bounded[0].reason
        assert r.sites[ATTACKER].num_examples == 10**6  # the metrics keep what the site reported
    bounded = [e for e in _audit(out) if e["event"] == "update_bounded"]
    assert [e["site"] for e in bounded] == [ATTACKER] * ROUNDS
    from fedseek.outputs.report import build_report

    page = build_report(out)  # the report lists each bounded update with its reason
    assert "Bounded influence" in page and page.count("num-examples 1000000 counted as") == ROUNDS
    _honest_never_blamed(rows, summary, out)
    assert summary.final_accuracy == pytest.approx(clean_accuracy, abs=0.02)


def test_a_rule_that_raises_keeps_the_previous_model_and_the_run_goes_on(tmp_path, monkeypatch):
    """Aggregation itself failing (here: FedAvg raising in round 2) is recorded with the reason; the round keeps the model."""
    from flwr.serverapp.strategy import FedAvg

    real = FedAvg.aggregate_train

    def flaky(self, server_round, replies):
        if server_round == 2:
            raise ValueError("aggregation blew up")
        return real(self, server_round, replies)

    monkeypatch.setattr(FedAvg, "aggregate_train", flaky)
    summary, out = _run(tmp_path, None)
    r1, r2, r3 = read_rows(out / "metrics.jsonl")
    assert summary.rounds_completed == ROUNDS and r1.model_kept is None and r3.model_kept is None
    assert r2.model_kept and "FedAvg raised ValueError: aggregation blew up" in r2.model_kept and r2.accepted == 3
    assert r2.central == r1.central  # the global model of round 1 was kept
    kept = [e for e in _audit(out) if e["event"] == "global_model_kept"]
    assert [e["round"] for e in kept] == [2] and "aggregation blew up" in kept[0]["reason"]


def _flip_and_inflate(content: RecordDict) -> None:
    scaled(-2.0)(content)
    num_examples(10**6)(content)


@pytest.mark.parametrize("mode, attack", [("sign_flip_x2.9", scaled(-2.9)), ("sign_flip_x2+inflated", _flip_and_inflate)])
def test_attacks_within_the_bounds_need_a_robust_rule(tmp_path, mode, attack, clean_median_accuracy):
    """Within the default bounds (norm < 3x the median, weight at most 3x) FedAvg can still be pulled backwards by one site of
    three; FedMedian, one of the robust rules, holds: the run completes within 2 points of its clean run, honest sites unblamed."""
    summary, out = _run(tmp_path, attack, strategy={"name": "fedmedian"})
    rows = read_rows(out / "metrics.jsonl")
    assert all(r.accepted == 3 and r.model_kept is None for r in rows)  # in bounds: accepted (and, inflated, its weight bounded)
    assert all([b.site for b in r.bounded] == ([ATTACKER] if "inflated" in mode else []) for r in rows)
    _honest_never_blamed(rows, summary, out)
    assert summary.final_accuracy == pytest.approx(clean_median_accuracy, abs=0.02)
