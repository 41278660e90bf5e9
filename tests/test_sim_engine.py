"""fedseek's one-pass message sweep for Flower's simulation engine, against Flower's own per-node sweep on its real link state."""

from __future__ import annotations

from collections.abc import Iterator
from queue import Queue
from typing import Any

import pytest

from fedseek.ops.sim_engine import deliver_pending, patch
from tests.conftest import flower_task_identity

RUN_ID = 1


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """The ServerApp's identity inside Flower's simulation: messages come from the SuperLink's node."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    with flower_task_identity():
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        yield


def _state(num_nodes: int, per_node: list[int]) -> tuple[Any, dict[int, int], list[str]]:
    """Flower's in-memory link state as its simulation builds it (run, task, nodes), and messages pushed through its grid."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=RUN_ID)
    nodes = _register_nodes(num_nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    ids = list(nodes)
    msgs = [Message(RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=ids[i % num_nodes], message_type="train")
            for k in range(max(per_node)) for i in range(num_nodes) if k < per_node[i]]
    pushed = list(grid.push_messages(msgs))
    return state, nodes, pushed


def _flower_sweep(state: Any, nodes: dict[int, int]) -> list[str]:
    """What Flower 1.41's add_messages_to_queue does in one sweep."""
    out = []
    for node_id in nodes:
        out += [m.metadata.message_id for m in state.get_message_ins(node_id=node_id, limit=1)]
    return out


def _ours(state: Any, nodes: dict[int, int]) -> list[str]:
    q: Queue[Any] = Queue()
    assert deliver_pending(state, q, nodes) is not None
    return [q.get_nowait().metadata.message_id for _ in range(q.qsize())]


def _handed_out(state: Any, order: list[int], ids: list[str]) -> list[tuple[int, int]]:
    """(node position, payload) of the messages a sweep handed out: message ids differ between two states."""
    return sorted((order.index(state.message_ins_store[i].metadata.dst_node_id),
                   int(state.message_ins_store[i].content.config_records["c"]["k"])) for i in ids)


def test_one_pass_sweep_delivers_what_flowers_per_node_sweep_delivers_sweep_after_sweep() -> None:
    per_node = [2, 0, 1, 3, 1]  # some nodes have several messages queued, one has none
    a, nodes_a, _ = _state(5, per_node)
    b, nodes_b, _ = _state(5, per_node)
    order_a, order_b = list(nodes_a), list(nodes_b)
    for sweep in range(4):
        flower, ours = _flower_sweep(a, nodes_a), _ours(b, nodes_b)
        assert _handed_out(a, order_a, flower) == _handed_out(b, order_b, ours), sweep
        assert len(ours) == sum(1 for n in per_node if n > sweep)  # one per node with something left, never two
    assert all(m.metadata.delivered_at for m in b.message_ins_store.values())


def test_an_expired_message_is_dropped_as_flower_drops_it() -> None:
    a, nodes_a, ids_a = _state(3, [1, 1, 1])
    b, nodes_b, ids_b = _state(3, [1, 1, 1])
    for state, ids in ((a, ids_a), (b, ids_b)):
        state.message_ins_store[ids[1]].metadata.__dict__["_ttl"] = 1e-9  # expired since it was created
    assert len(_flower_sweep(a, nodes_a)) == len(_ours(b, nodes_b)) == 2
    assert ids_a[1] not in a.message_ins_store and ids_b[1] not in b.message_ins_store


def test_the_patch_replaces_flowers_sweep_once() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    from fedseek.ops import sim_engine

    original = getattr(vce_api, "_fedseek_original_add", vce_api.add_messages_to_queue)
    try:
        patch()
        patch()
        assert vce_api.add_messages_to_queue is sim_engine.add_messages_to_queue
        assert vce_api._fedseek_original_add is original
    finally:
        vce_api.add_messages_to_queue = original
        vce_api.__dict__.pop("_fedseek_original_add", None)
