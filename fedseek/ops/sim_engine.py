"""Flower's simulation engine without its per-node sweep of the whole message store (`flwr-simulation`, patched).

Flower 1.41's simulation runtime hands messages to the Ray actors from a thread that, every
0.1 s, asks the link state for each node's next message: one `get_message_ins(node_id, limit=1)`
per node, and each call walks every stored message (checking its expiry and federation). With N
nodes and M stored messages that is N x M checks per sweep, all the time, in the process that
also runs the ServerApp: at 1,000 sites sampled every round the sweep kept one of the two cores
busy (measured with py-spy: 56% of that process's samples) and the round took 11-12 s.

`deliver_pending` does the same work in one pass: it picks, in store order, the first
undelivered message of each node the engine serves, checks it with Flower's own
`_check_stored_messages` (expiry, federation; invalid ones are deleted as Flower does) and marks it
delivered as `get_message_ins` does. Only the in-memory link state the engine uses is handled;
any other state keeps Flower's own sweep. `python -m fedseek.ops.sim_engine` is Flower's
`flwr-simulation` entry point with this applied; `fedseek simulate` puts a `flwr-simulation`
shim first on the SuperLink's PATH (see fedseek.ops.simulate).
"""

from __future__ import annotations

import logging
import sys
import threading
from queue import Queue
from typing import Any

log = logging.getLogger("fedseek.ops.sim_engine")


def deliver_pending(state: Any, queue: Queue[Any], nodes: Any) -> int | None:
    """One sweep: queue each served node's first undelivered, valid message (marked delivered); None if not an in-memory state."""
    store, lock, check = (getattr(state, n, None) for n in ("message_ins_store", "lock", "_check_stored_messages"))
    if store is None or lock is None or check is None:
        return None
    from flwr.supercore.date import now

    with lock:
        first: dict[int, str] = {}
        for msg_id, msg in list(store.items()):
            node = msg.metadata.dst_node_id
            if node not in first and node in nodes and msg.metadata.delivered_at == "":
                first[node] = msg_id
        delivered = []
        for msg_id in first.values():
            check({msg_id})  # Flower's own expiry / federation check (deletes an invalid message)
            msg = store.get(msg_id)
            if msg is not None and msg.metadata.delivered_at == "":
                delivered.append(msg)
        stamp = now().isoformat()
        for msg in delivered:
            msg.metadata.delivered_at = stamp
    for msg in delivered:
        queue.put(msg)
    return len(delivered)


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower's `add_messages_to_queue` (same loop, same 0.1 s wait) with one pass per sweep instead of one per node."""
    from flwr.server.superlink.fleet.vce import vce_api

    if not all(hasattr(state, n) for n in ("message_ins_store", "lock", "_check_stored_messages")):
        log.warning("simulation link state %s is not Flower's in-memory one: Flower's own sweep is used", type(state).__name__)
        vce_api.__dict__["_fedseek_original_add"](state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        deliver_pending(state, queue, nodes_mapping)
        f_stop.wait(0.1)


def patch() -> None:
    """Install the one-pass sweep in Flower's simulation runtime (idempotent)."""
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api, "_fedseek_original_add", None) is None:
        vce_api.__dict__["_fedseek_original_add"] = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue


def main() -> None:
    """`flwr-simulation` with the patch: the same arguments and exit status as Flower's entry point."""
    patch()
    from flwr.simulation.app import flwr_simulation

    sys.argv[0] = "flwr-simulation"
    flwr_simulation()  # returns None or exits with Flower's own status


if __name__ == "__main__":
    main()
