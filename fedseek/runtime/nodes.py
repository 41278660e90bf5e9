"""Which sites are connected: node ids from Flower's Grid mapped to stable site names, joins and losses audited.

Node ids change whenever a SuperNode restarts; site names do not, so sampling and resume are
keyed by name. A site that vanished is not waited for (the round goes on with the sites alive)
and is used again as soon as Flower lists it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseek.runtime.log import flwr_log
from fedseek.wire.records import SITE

POLL_S = 0.1  # how often to re-list nodes while waiting for sites to connect
Audit = Callable[..., None]


class NodeTracker:
    """Node id -> site name, plus the nodes seen and lost during the run."""

    def __init__(self, grid: Grid, run_id: str, audit: Audit, *, node_wait_s: float, query_timeout_s: float) -> None:
        self.grid, self.run_id, self.audit = grid, run_id, audit
        self.node_wait_s, self.query_timeout_s = node_wait_s, query_timeout_s
        self.names: dict[int, str] = {}
        self.seen: set[int] = set()  # every node Flower has listed during this run
        self.lost: set[int] = set()  # listed earlier, not listed now (dead, or its heartbeat expired)

    def name(self, node: int) -> str:
        """The site name of a node ("node-N" until it has told us)."""
        return self.names.get(node, f"node-{node}")

    def wait_for(self, expected: int) -> list[int]:
        """Block until `expected` sites are registered (Flower otherwise samples fewer in round 1)."""
        deadline = time.monotonic() + self.node_wait_s
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {expected} sites connected within {self.node_wait_s:.0f}s")
            time.sleep(POLL_S)
            nodes = sorted(self.grid.get_node_ids())
        self.discover(nodes)
        return nodes

    def discover(self, nodes: list[int]) -> None:
        """Ask nodes we have not met yet which site they are (one QUERY round trip, only for new nodes)."""
        new = [n for n in nodes if n not in self.names]
        if not new:
            return
        content = RecordDict({"config": ConfigRecord({"run-id": self.run_id})})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in self.grid.send_and_receive(msgs, timeout=self.query_timeout_s):
            node = int(reply.metadata.src_node_id)
            if reply.has_error() or SITE not in reply.content.config_records:
                continue
            self.names[node] = str(reply.content.config_records[SITE].get("name", "")) or f"node-{node}"
            self.audit("site_joined", site=self.names[node], node_id=node)

    def alive(self, need: int, next_round: int) -> list[int]:
        """Nodes to use this round: wait (bounded) only for sites that never connected, then go on with whoever is there."""
        deadline = time.monotonic() + self.node_wait_s
        nodes = sorted(self.grid.get_node_ids())
        while (not nodes or len(self.seen | set(nodes)) < need) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no site connected within {self.node_wait_s:.0f}s")
        listed = set(nodes)
        lost = self.seen - listed
        for n in sorted(lost - self.lost):
            flwr_log("site %s (node %d) is gone: going on without it", self.names.get(n, "?"), n)
            self.audit("site_lost", round=next_round, site=self.names.get(n, ""), node_id=n)
        for n in sorted(self.lost & listed):
            flwr_log("site %s (node %d) is back", self.names.get(n, "?"), n)
            self.audit("site_rejoined", round=next_round, site=self.names.get(n, ""), node_id=n)
        self.lost = lost
        self.seen |= listed
        if len(nodes) < need:
            flwr_log("only %d of %d sites alive: going on with them", len(nodes), need)
        self.discover(nodes)
        return nodes
