"""Send messages to sites and collect the replies, polling the SuperLink every 0.2 s instead of Flower's fixed 3 s.

Flower 1.41's deployed Grid (`HttpGrid.send_and_receive`) sleeps a hard-coded 3 s between pulls,
which alone adds 1.5 s on average (up to 3 s) to every exchange. Semantics are unchanged: push
once, pull the replies to those message ids until all arrived or `timeout` passed. Other grids
(simulation, the tests' fake Grid) keep their own send_and_receive. `FEDSEEK_PULL_INTERVAL_S` in the
coordinator's environment changes the interval (benchmarks/deploy_latency.py sets 3 to measure Flower's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL_S = min(30.0, max(0.05, float(os.environ.get("FEDSEEK_PULL_INTERVAL_S", "0.2"))))


def _is_http_grid(grid: Grid) -> bool:
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # pragma: no cover - another Flower layout: use its own loop
        return False
    return isinstance(grid, HttpGrid)


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     pull_interval_s: float = PULL_INTERVAL_S) -> list[Message]:
    """Push `messages` and pull their replies until all arrived or `timeout` seconds passed (like Grid.send_and_receive)."""
    if not _is_http_grid(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while pending and (timeout is None or time.monotonic() < end):
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(pull_interval_s if timeout is None else max(0.0, min(pull_interval_s, end - time.monotonic())))
    return replies
