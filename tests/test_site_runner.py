"""What fedseek changes in how Flower's deployed processes wait: the coordinator's pull loop, the SuperNode's idle poll,
and the warm SuperExec shim (end to end they run in every test_deploy*.py round)."""

from __future__ import annotations

import os
import stat
import subprocess
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from fedseek.ops.site_runner import _PollClock, patch_supernode_poll, write_superexec_shim
from fedseek.runtime.exchange import send_and_receive
from tests.test_adversarial_coordinator import _task_identity  # noqa: F401 - autouse fixture: Messages need a run id


class ScriptedHttpGrid(HttpGrid):
    """Flower's deployed Grid with push/pull answered in memory: replies become available after `ready_after_s`."""

    def __init__(self, ready_after_s: float):  # no connection: only push/pull are used
        self.ready_after_s, self.pulls, self.t0 = ready_after_s, 0, 0.0
        self.pushed: list[Message] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def, override]
        self.t0 = time.monotonic()
        self.pushed = list(messages)
        for i, m in enumerate(self.pushed):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def, override]
        self.pulls += 1
        if time.monotonic() - self.t0 < self.ready_after_s:
            return []
        return [Message(RecordDict(), reply_to=m) for m in self.pushed if m.metadata.message_id in set(message_ids)]


def _msgs(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)]


def test_replies_are_collected_within_a_pull_interval_not_flowers_three_seconds():
    grid = ScriptedHttpGrid(ready_after_s=0.5)
    t0 = time.monotonic()
    replies = send_and_receive(grid, _msgs(3), timeout=30, pull_interval_s=0.2)
    took = time.monotonic() - t0
    assert len(replies) == 3 and {r.metadata.reply_to_message_id for r in replies} == {"m0", "m1", "m2"}
    assert took < 2.5 and grid.pulls >= 3  # Flower's HttpGrid would sleep 3 s after its first empty pull


def test_the_timeout_still_bounds_the_wait():
    grid = ScriptedHttpGrid(ready_after_s=60)
    t0 = time.monotonic()
    assert send_and_receive(grid, _msgs(2), timeout=0.6, pull_interval_s=0.2) == []
    assert time.monotonic() - t0 < 2.0


def test_supernode_idle_poll_is_shortened_and_reply_waits_are_capped(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", time)
    assert patch_supernode_poll(0.25) is True
    clock = sci.time
    assert isinstance(clock, _PollClock) and clock.time() > 0  # every other attribute is the time module's
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock.sleep(3)
    clock.sleep(0.5)
    assert slept == [0.25, 0.05]


def test_superexec_shim_runs_fedseeks_warm_superexec(tmp_path):
    shim = write_superexec_shim(tmp_path / "bin")
    assert shim.name == "flower-superexec" and os.stat(shim).st_mode & stat.S_IXUSR
    assert "-m fedseek.ops.site_runner superexec" in shim.read_text()
    res = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--runtime-api-address" in res.stdout  # Flower's own argument parser answers
