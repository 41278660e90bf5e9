"""Which sites are connected and who each node is: node ids from Flower's Grid mapped to stable site names.

Node ids change whenever an unauthenticated SuperNode restarts; site names do not, so sampling
and resume are keyed by name. Deployment with registered sites: a node's name is the site
whose registered key Flower authenticated for it (`runtime.identity`), no question asked.
Simulation: a node new to the run is asked once (QUERY) which site it is; that QUERY shares the
round's time-out with the round's training (it may use at most `query_timeout_s` of it).

A site that vanished is not waited for (the round goes on with the sites alive) and is used
again as soon as Flower lists it again. A listed site that sends nothing is left out of the next
rounds with exponential back-off (`runtime.identity.Backoff`); joins, losses, time-outs,
back-offs and impersonations are audited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseek.runtime.exchange import send_and_receive
from fedseek.runtime.identity import Backoff, SiteKeys, claim_problem
from fedseek.runtime.log import flwr_log
from fedseek.wire.records import SITE, site_name
from fedseek.wire.screening import Issue, Screened

POLL_S = 0.1  # how often to re-list nodes while waiting for sites to connect
QUERY_SHARE = 0.5  # the most of a round's time-out the simulation's "which site are you" QUERY may use (Ray starts its actors then)
Audit = Callable[..., None]


@dataclass
class RoundNodes:
    """What node tracking saw in one round."""

    round: int = 0
    silent: list[int] = field(default_factory=list)  # nodes that did not answer the QUERY (counted as timed out)
    skipped: list[str] = field(default_factory=list)  # sites left out this round: backing off after time-outs
    impersonations: list[Issue] = field(default_factory=list)  # train replies naming another site (rejected)
    query_seconds: float = 0.0  # time the QUERY took out of this round's time-out


class NodeTracker:
    """Node id -> site name, the nodes seen and lost during the run, and the back-off of silent sites."""

    def __init__(self, grid: Grid, run_id: str, audit: Audit, *, node_wait_s: float, query_timeout_s: float,
                 keys: dict[str, bytes] | None = None) -> None:
        """`keys` (site -> DER SPKI): identify nodes by their registered key (deployment); None: by QUERY (simulation)."""
        self.grid, self.run_id, self.audit = grid, run_id, audit
        self.node_wait_s, self.query_timeout_s = node_wait_s, query_timeout_s
        self.keys = SiteKeys(keys) if keys else None
        self.names: dict[int, str] = {}
        self.seen: set[int] = set()  # every node Flower has listed during this run
        self.lost: set[int] = set()  # listed earlier, not listed now (dead, or its heartbeat expired)
        self.backoff = Backoff()
        self.round = RoundNodes()
        self._listed: set[int] = set()
        self._unknown: set[int] = set()  # listed nodes whose key is no registered site's (audited once)

    def name(self, node: int) -> str:
        """The site name of a node ("node-N" until it is identified)."""
        return self.names.get(node, f"node-{node}")

    def owner(self, site: str) -> int | None:
        """The listed node that holds site name `site` (None: none)."""
        return next((n for n, name in self.names.items() if name == site and n in self._listed), None)

    # ------------------------------------------------------------------ listing and identity
    def listed(self) -> list[int]:
        """The nodes Flower lists now; with registered keys only those whose authenticated key is a registered site's."""
        if self.keys is None:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
        else:
            nodes = sorted(self._identify(list(self.grid.get_nodes())))
        self._listed = set(nodes)
        return nodes

    def _identify(self, infos: list[Any]) -> list[int]:
        assert self.keys is not None
        nodes = []
        for info in infos:
            node, key = int(info.node_id), bytes(info.public_key)
            site = self.keys.site_of(key)
            if site is None:
                if node not in self._unknown:
                    self._unknown.add(node)
                    flwr_log("node %d is listed but its key (%s) is no registered site's: never used", node, self.keys.fingerprint(key))
                    self.audit("unknown_node", node_id=node, key=self.keys.fingerprint(key))
                continue
            self._bind(node, site, "key")
            nodes.append(node)
        return nodes

    def _bind(self, node: int, site: str, how: str) -> None:
        if self.names.get(node) == site:
            return
        for other in [n for n, name in self.names.items() if name == site]:
            del self.names[other]  # the site's earlier node (gone: a restarted SuperNode without node auth)
        self.names[node] = site
        self.audit("site_joined", site=site, node_id=node, identity=how)

    def wait_for(self, expected: int) -> list[int]:
        """Block until `expected` sites are listed (Flower otherwise samples fewer in round 1)."""
        deadline = time.monotonic() + self.node_wait_s
        nodes = self.listed()
        while len(nodes) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {expected} sites connected within {self.node_wait_s:.0f}s")
            time.sleep(POLL_S)
            nodes = self.listed()
        return nodes

    def discover(self, nodes: list[int]) -> None:
        """Simulation: ask nodes not identified yet which site they are (one QUERY, at most query_timeout_s); no-op with keys."""
        new = [n for n in nodes if n not in self.names]
        if self.keys is not None or not new:
            return
        content = RecordDict({"config": ConfigRecord({"run-id": self.run_id})})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        t0 = time.monotonic()
        replies = send_and_receive(self.grid, msgs, timeout=self.query_timeout_s)
        self.round.query_seconds += time.monotonic() - t0
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs if m.metadata.message_id}
        answered = set()
        for reply in replies:
            node = dst.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            answered.add(node)
            if reply.has_error() or SITE not in reply.content.config_records or self.check_claim(node, reply, "query"):
                continue
            self._bind(node, site_name(reply.content) or f"node-{node}", "query")
        for n in new:
            if n not in answered:
                self._silent(n)

    def _silent(self, node: int) -> None:
        """A node that did not answer the QUERY: timed out this round, backing off."""
        self.round.silent.append(node)
        flwr_log("node %d sent no answer to the site QUERY within %.1fs", node, self.query_timeout_s)
        self.audit("site_timed_out", round=self.round.round, site=self.name(node), node_id=node, message="query",
                   timeout_s=self.query_timeout_s)
        self._missed(node)

    # ------------------------------------------------------------------ each round
    def alive(self, need: int, next_round: int) -> list[int]:
        """Nodes to use this round: wait (bounded) only for sites that never connected, then go on with whoever is there.

        Sites backing off after time-outs are left out (named in `round.skipped`), and so are
        nodes that do not answer their first QUERY (simulation).
        """
        self.round = RoundNodes(round=next_round)
        deadline = time.monotonic() + self.node_wait_s
        nodes = self.listed()
        while (not nodes or len(self.seen | set(nodes)) < need) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            nodes = self.listed()
        if not nodes:
            raise RuntimeError(f"no site connected within {self.node_wait_s:.0f}s")
        self._track(nodes, next_round)
        if len(nodes) < need:
            flwr_log("only %d of %d sites alive: going on with them", len(nodes), need)
        asked = []
        for n in nodes:
            if self.backoff.skipping(self.name(n), next_round):
                self.round.skipped.append(self.name(n))
            else:
                asked.append(n)
        if self.round.skipped:
            flwr_log("round %d: backing off from %s (no reply in earlier rounds)", next_round, ", ".join(self.round.skipped))
        self.discover(asked)
        return [n for n in asked if n not in self.round.silent]

    def _track(self, nodes: list[int], next_round: int) -> None:
        """Audit nodes lost since the last listing and nodes back after a loss."""
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

    def after_round(self, sampled: list[int], timed_out: list[int]) -> None:
        """Back-off bookkeeping once a round's replies are in: sites that sent nothing back off, the others are reset."""
        for n in timed_out:
            self._missed(n)
        for n in set(sampled) - set(timed_out):
            self.backoff.answered(self.name(n))

    def _missed(self, node: int) -> None:
        site, rnd = self.name(node), self.round.round
        k, skip = self.backoff.missed(site, rnd)
        flwr_log("site %s: %d time-out(s) in a row, left out of the next %d round(s)", site, k, skip)
        self.audit("site_backoff", round=rnd, site=site, node_id=node, timeouts=k, skip_rounds=skip, retry_round=rnd + 1 + skip)

    def targets(self, excluded: Collection[str]) -> list[int]:
        """Nodes to send an evaluation to now: identified, not excluded, not backing off (new nodes are asked their name first)."""
        rnd = self.round.round
        nodes = [n for n in self.listed() if not self.backoff.skipping(self.name(n), rnd)]
        self.discover(nodes)
        return [n for n in nodes if n not in self.round.silent and self.name(n) not in excluded]

    # ------------------------------------------------------------------ replies
    def check_claim(self, node: int, reply: Message, kind: str) -> str:
        """"" when `reply` may come from `node`; otherwise "impersonation: ..." (audited, and never held against the named site)."""
        if reply.has_error():
            return ""
        src, claimed = int(reply.metadata.src_node_id), site_name(reply.content)
        if src != node:
            problem = f"reply from node {src} answers the message sent to node {node}"
        else:
            problem = claim_problem(claimed, self.names.get(node), self.owner(claimed), node)
        if not problem:
            return ""
        self.names.setdefault(node, f"node-{node}")  # an unidentified impostor keeps its placeholder, never the claimed name
        flwr_log("impersonation (%s reply): %s", kind, problem)
        self.audit("impersonation", round=self.round.round, message=kind, site=self.name(node), node_id=node, claimed=claimed,
                   reason=problem)
        return f"impersonation: {problem}"

    def verified(self, replies: list[Message], sent: list[Message]) -> list[Message]:
        """The train replies whose sender may say what they say; the others go to `round.impersonations` (rejected)."""
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
        kept = []
        for r in replies:
            node = dst.get(r.metadata.reply_to_message_id, int(r.metadata.src_node_id))
            problem = self.check_claim(node, r, "train")
            if problem:
                self.round.impersonations.append(Issue(node_id=node, site=self.name(node), reason=problem))
            else:
                kept.append(r)
        return kept

    def name_screened(self, screened: Screened) -> None:
        """Name every screened reply by its sender's identity (registered key or QUERY answer), never by what it wrote."""
        for reply in screened.accepted:
            reply.site = self.names.get(reply.node_id, reply.site)
        for issue in [*screened.rejected, *screened.refused]:
            issue.site = self.names.get(issue.node_id, issue.site)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The back-off of silent sites (names, not node ids: ids change across restarts)."""
        return {"backoff": self.backoff.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.backoff.load_state_dict(state.get("backoff", {}))
