"""Distributed DP at the coordinator: one round's updates summed with Flower's SecAgg+ workflow; only the sum is unmasked.

Flower 1.41 has SecAgg+ only in its legacy workflow API (`SecAggPlusWorkflow` over a `LegacyContext`). fedseek drives it
for one round at a time, on the sites its own strategy sampled, with the round's own messages (model, typed config) as
the training instructions, and refuses to unmask a sum holding fewer than `min_sites` sites' updates. Every sampled site
is a neighbour of every other (num_shares = sites) so each site sees how many survive, and the key-share threshold is
above the colluders assumed. The workflow's protocol code is Flower's; nothing cryptographic is written here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Scalar,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedseek.config import SecureAggregationSpec

log = logging.getLogger(__name__)
MAX_SECURE_SITES = 1023  # Flower's SecAgg+ sums 2^22-level values modulo 2^32: at most 1,023 sites per sum


@dataclass
class SecureOutcome:
    """One secure round: the unmasked mean of the sites' values (None when halted), and what each stage got back."""

    mean: list[np.ndarray] | None = None
    halted: str = ""  # why no sum was unmasked
    collected: list[Message] = field(default_factory=list)  # the training stage's replies (masked vectors, metrics, errors)
    sent_to: dict[str, int] = field(default_factory=dict)  # the training stage's message ids -> node ids
    answered_setup: set[int] = field(default_factory=set)  # nodes that answered the first stage
    errors: dict[int, str] = field(default_factory=dict)  # node -> the first error it replied with (any stage)
    malformed: dict[int, str] = field(default_factory=dict)  # node -> why its reply was malformed (counted as a drop-out)
    stages: int = 0  # stages whose replies arrived (4: complete)
    value_range: float = 0.0  # SecAgg+'s clipping range: an honest mean lies within it
    bytes_up: int = 0  # masked vectors received


class _Proxy(ClientProxy):
    """A node id, which is all the legacy workflow reads from its client proxies."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None) -> GetPropertiesRes:
        raise NotImplementedError

    def get_parameters(self, ins: GetParametersIns, timeout: float | None, group_id: int | None) -> GetParametersRes:
        raise NotImplementedError

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        raise NotImplementedError

    def evaluate(self, ins: EvaluateIns, timeout: float | None, group_id: int | None) -> EvaluateRes:
        raise NotImplementedError

    def reconnect(self, ins: ReconnectIns, timeout: float | None, group_id: int | None) -> Any:
        raise NotImplementedError


class _Capture(LegacyStrategy):
    """The legacy strategy the workflow calls: it 'selects' fedseek's sampled sites and keeps the unmasked mean."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(_Proxy(n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:  # every result carries the same unmasked mean (the workflow's backward compatibility)
            self.mean = [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Recorder:
    """The Grid as the workflow sees it: keeps every stage's replies, and turns a malformed one into an error reply.

    Flower's workflow reads the sites' replies without checking them (a missing key or a wrong shape raises); a site
    whose reply is malformed is treated as a site that dropped out at that stage, which SecAgg+ is built to survive.
    """

    def __init__(self, grid: Grid, nodes: list[int], shapes: list[tuple[int, ...]] | None) -> None:
        self.grid, self.nodes, self.shapes = grid, set(nodes), shapes
        self.stages: list[list[Message]] = []
        self.sent: list[list[Message]] = []
        self.malformed: dict[int, str] = {}

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = len(self.stages)
        by_id = {m.metadata.message_id: m for m in messages}
        checked = []
        for r in replies:
            sent = by_id.get(r.metadata.reply_to_message_id)
            why = stage_problem(stage, r, self.nodes, self.shapes) if sent is not None else "answers no message of this stage"
            if why is None:
                checked.append(r)
                continue
            node = int(sent.metadata.dst_node_id) if sent is not None else int(r.metadata.src_node_id)
            self.malformed.setdefault(node, f"malformed reply to secure-aggregation stage {stage}: {why}")
            log.warning("site node %d: %s", node, self.malformed[node])
            if sent is not None:
                checked.append(Message(Error(code=ErrorCode.UNKNOWN, reason=self.malformed[node]), reply_to=sent))
        self.sent.append(messages)
        self.stages.append(checked)
        return checked

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class GuardedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ with fedseek's round contents, and no unmasking of a sum of fewer than `min_sites` sites."""

    def __init__(self, contents: dict[int, RecordDict], min_sites: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contents, self.min_sites = contents, min_sites
        self.halted = ""

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        # the training stage sends fedseek's own message to each site (a copy: the workflow adds its stage record to it)
        state.nid_to_fitins = {nid: RecordDict(dict(self.contents[nid].items())) for nid in state.nid_to_fitins}
        _forget_dropped(state)
        if not ok:
            self.halted = self.halted or "too few sites answered the key set-up"
        return bool(ok)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = bool(super().share_keys_stage(grid, context, state))
        _forget_dropped(state)
        if not ok:
            self.halted = "too few sites shared their keys"
        return ok

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = bool(super().collect_masked_vectors_stage(grid, context, state))
        if not ok:
            self.halted = "too few sites sent a masked update"
        return ok

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        alive = len(state.active_node_ids)
        if alive < self.min_sites:
            self.halted = (f"only {alive} sites' masked updates arrived, fewer than secure_aggregation.min_sites {self.min_sites}: "
                           "the sum was not unmasked")
            log.warning("%s", self.halted)
            return False
        ok = bool(super().unmask_stage(grid, context, state))
        if not ok:
            self.halted = "too few sites returned key shares to unmask the sum"
        return ok


MAX_KEY_BYTES = 4096  # a serialized public key, a share or an encrypted share is far smaller


def stage_problem(stage: int, reply: Message, nodes: set[int], shapes: list[tuple[int, ...]] | None) -> str | None:
    """Why a site's reply to SecAgg+ stage `stage` (0 setup, 1 share keys, 2 masked vector, 3 unmask) is malformed."""
    if reply.has_error():
        return None
    try:
        cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
        if stage == 0:
            keys = [cfg[Key.PUBLIC_KEY_1], cfg[Key.PUBLIC_KEY_2]]
            return None if all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in keys) else "public keys are not bytes"
        if stage == 1:
            return _pairs(cfg[Key.DESTINATION_LIST], cfg[Key.CIPHERTEXT_LIST], nodes, 4 * MAX_KEY_BYTES)
        if stage == 2:
            arrays = [bytes_to_ndarray(b) for b in cast(list[bytes], cfg[Key.MASKED_PARAMETERS])]
            if shapes is not None and [tuple(a.shape) for a in arrays] != [(1,), *shapes]:
                return "the masked vector does not have the model's shapes"
            if not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
                return "the masked vector is not integers"
            recorddict_to_fitres(reply.content, keep_input=True)  # the workflow reads these legacy fields
            return None
        return _pairs(cfg[Key.NODE_ID_LIST], cfg[Key.SHARE_LIST], nodes, MAX_KEY_BYTES)
    except Exception as exc:  # whatever a site sends, the worst outcome is that its reply counts as a drop-out
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def _pairs(ids: Any, blobs: Any, nodes: set[int], max_bytes: int) -> str | None:
    """Node ids and byte strings, pairwise, every id one of the round's sites."""
    if not (isinstance(ids, list) and isinstance(blobs, list) and len(ids) == len(blobs) <= len(nodes)):
        return "node ids and byte strings do not pair up"
    if any(type(i) is not int or i not in nodes for i in ids):
        return "names a node outside the round"
    if any(not isinstance(b, bytes) or len(b) > max_bytes for b in blobs):
        return "a share is not bytes or too long"
    return None


def _forget_dropped(state: Any) -> None:
    """Sites that left before sending their key shares are in no mask and hold no share: take them out of the round.

    Flower 1.41's workflow keeps them as "sampled" and, at unmasking, asks the others for key shares of them that were
    never sent, which fails the whole round; only drop-outs after the key exchange are recoverable there.
    """
    alive = set(state.active_node_ids)
    state.sampled_node_ids = alive
    state.nid_to_neighbours = {nid: set(nb) & alive for nid, nb in state.nid_to_neighbours.items() if nid in alive}


def share_threshold(sites: int, colluders: int) -> int:
    """Key shares needed to rebuild a secret: a majority of the sites, and more than the colluders hold."""
    return min(sites - 1, max(2, sites // 2 + 1, colluders + 1))


def secure_exchange(grid: Grid, server_round: int, messages: list[Message], spec: SecureAggregationSpec,
                    timeout: float | None, shapes: list[tuple[int, ...]] | None = None) -> SecureOutcome:
    """Run SecAgg+ for one round over the sampled sites' messages; the mean of their values if at least min_sites made it.

    `shapes`: the model's array shapes (a masked vector of other shapes is malformed). Nothing a site sends can make
    this raise: a malformed reply counts as a drop-out, and a protocol failure (e.g. shares that rebuild no secret)
    halts the round with its reason.
    """
    contents = {int(m.metadata.dst_node_id): m.content for m in messages}
    nodes = sorted(contents)
    out = SecureOutcome(value_range=float(spec.clipping_range))
    if len(nodes) < spec.min_sites:
        out.halted = f"{len(nodes)} sites sampled, fewer than secure_aggregation.min_sites {spec.min_sites}: no secure round"
        return out
    if len(nodes) > MAX_SECURE_SITES:
        out.halted = f"{len(nodes)} sites sampled: SecAgg+ sums at most {MAX_SECURE_SITES} (lower strategy.fraction_train)"
        return out
    workflow = GuardedSecAggPlus(
        contents, spec.min_sites, num_shares=len(nodes), reconstruction_threshold=share_threshold(len(nodes), spec.colluders),
        max_weight=1.0, clipping_range=float(spec.clipping_range), timeout=timeout)
    capture = _Capture(nodes)
    state = RecordDict({"config": ConfigRecord({"current_round": int(server_round)}), "parameters": ArrayRecord()})
    base = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    manager = SimpleClientManager()
    for n in nodes:  # only for the workflow's log line ("sampled K clients (out of K)")
        manager.register(_Proxy(n))
    context = LegacyContext(base, config=ServerConfig(num_rounds=server_round), strategy=capture, client_manager=manager)
    recorder = _Recorder(grid, nodes, shapes)
    failure = ""
    try:
        workflow(recorder, context)  # type: ignore[arg-type]
    except Exception as exc:  # e.g. a site's key share that rebuilds no secret: the round fails, the run goes on
        failure = f"the protocol failed ({type(exc).__name__}: {str(exc)[:200]})"
        log.warning("round %d: secure aggregation %s", server_round, failure)
    out.stages = len(recorder.stages)
    out.malformed = dict(recorder.malformed)
    for sent, replies in zip(recorder.sent, recorder.stages, strict=True):
        dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
        for r in replies:
            if r.has_error():
                out.errors.setdefault(dst.get(r.metadata.reply_to_message_id, int(r.metadata.src_node_id)), str(r.error.reason))
    if recorder.stages:
        out.answered_setup = {int(r.metadata.src_node_id) for r in recorder.stages[0]}
    if len(recorder.stages) >= 3:
        out.collected = recorder.stages[2]
        out.sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in recorder.sent[2]}
        out.bytes_up = sum(_masked_bytes(r) for r in out.collected)
    out.mean = None if failure else capture.mean
    if out.mean is None:
        out.halted = failure or workflow.halted or "secure aggregation halted"
    return out


def _masked_bytes(reply: Message) -> int:
    if reply.has_error():
        return 0
    try:
        vec = cast(list[bytes], reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        return int(sum(len(b) for b in vec))
    except (KeyError, TypeError):
        return 0
