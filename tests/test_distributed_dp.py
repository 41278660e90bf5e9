"""Distributed DP: sites send noise shares only inside Flower's SecAgg+ sum; the coordinator unmasks only the sum.

In-process (the coordinator and the real ClientApp, with Flower's real SecAgg+ workflow and mod, over a fake Grid that
serializes every message as the transport does). Adversaries: a coordinator that tries to unmask a sum of fewer sites
than the sites' min_sites, a coordinator holding fewer key shares than the threshold, a site that drops out mid-round,
a site whose policy is distributed asked to train in the clear.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

import fedseek.runtime.site_secure as site_secure
from fedseek.config import ConfigError, load_scenario
from fedseek.outputs.schema import read_rows
from fedseek.privacy import PrivacyLedger
from fedseek.runtime.secure_round import GuardedSecAggPlus, share_threshold
from fedseek.wire.records import METRICS, TrainMetrics
from tests.test_coordinator import FakeGrid, _coordinator, _run_config, _scenario, in_process_sites

PRIVACY = {"epsilon_budget": 3.0, "delta": 1e-5, "mode": "distributed", "planning_rounds": 20,
           "distributed": {"min_sites": 4, "colluders": 1}}


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Flower Messages need the process' task identity (tests/conftest.py)."""


def _distributed(tmp: Path, num_sites: int = 5, rounds: int = 2, **over) -> Path:
    return _scenario(tmp, num_sites=num_sites, rounds=rounds, strategy={"min_sites": 4}, privacy=PRIVACY, **over)


class RecordingGrid(FakeGrid):
    """A fake Grid that keeps every reply, as a curious coordinator would."""

    def __init__(self, nodes, respond) -> None:
        super().__init__(nodes, respond)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies


def _masked(replies: list[Message]) -> list[Message]:
    return [r for r in replies if not r.has_error() and RECORD_KEY_CONFIGS in r.content.config_records
            and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]


def test_the_unmasked_sum_is_the_example_weighted_step_and_single_replies_stay_masked(tmp_path, monkeypatch):
    """One round: the new global model is the global plus the example-weighted mean of the sites' (noisy) steps, to
    SecAgg+'s quantization; what each site sent is uniform noise to the coordinator; the ledgers charge the sum's noise
    and record each site's share (its local floor)."""
    sent: list[tuple[dict[str, np.ndarray], list[np.ndarray], int]] = []
    real = site_secure._secure_reply

    def spy(msg, context, site, cfg, dp, ledger):
        from fedseek.runtime.site import load_global

        reply = real(msg, context, site, cfg, dp, ledger)
        _, global_arrays, _ = load_global(msg, cfg)
        values = parameters_to_ndarrays(recorddict_to_fitres(reply.content, keep_input=True).parameters)
        sent.append((global_arrays, values, TrainMetrics.from_record(reply.content.metric_records[METRICS]).num_examples))
        return reply

    monkeypatch.setattr(site_secure, "_secure_reply", spy)
    scen, out, state = _distributed(tmp_path, rounds=1), tmp_path / "out", tmp_path / "state"
    rc, nodes = {**_run_config(scen, out), "state-dir": str(state)}, [1, 2, 3, 4, 5]
    grid = RecordingGrid(nodes, in_process_sites(rc, nodes))
    summary = _coordinator(grid, rc)
    assert summary.status == "completed" and len(sent) == 5
    (row,) = read_rows(out / "metrics.jsonl")
    assert row.accepted == 5 and row.model_kept is None
    glob = sent[0][0]
    total = sum(n for _, _, n in sent)
    expected = {k: glob[k] + sum(v[i] for _, v, _ in sent) / total for i, k in enumerate(glob)}
    model = torch.load(out / "model.pt", weights_only=True)
    state_dict = model.get("state_dict", model)
    for k in glob:
        got = np.asarray(state_dict[k], dtype=np.float64)
        # SecAgg+ quantizes each value to 2 x 64 / 2^22 (stochastic rounding), then the sum is scaled by 1 / N
        assert np.allclose(got, expected[k], atol=5 * 128 / 2**22 * 5 / total + 1e-6), k
    # the coordinator's view of one site: masked integers, uncorrelated with what the site sent
    masked = _masked(grid.replies)
    assert len(masked) == 5
    for r in masked:
        assert all(len(rec) == 0 for rec in r.content.array_records.values())  # the site's own values never leave it
        parts = [bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        vec = np.concatenate([p.ravel() for p in parts[1:]]).astype(np.float64) / 2**32  # parts[0]: the weight factor
        quarters = np.histogram(vec, bins=4, range=(0, 1))[0] / vec.size
        assert np.all(np.abs(quarters - 0.25) < 0.1), quarters  # uniform masks (5 sd); unmasked values all sit in one quarter
    # the ledgers: the sum's noise charged, each site's share recorded as its floor
    site_dirs = sorted(p.parent for p in state.rglob("privacy_ledger.json"))
    assert len(site_dirs) == 5
    ledger = PrivacyLedger(site_dirs[0], accountant="prv", delta=1e-5, epsilon_budget=3.0)
    entry = [e for e in json.loads((site_dirs[0] / "privacy_ledger.json").read_text())["entries"] if e["type"] == "charge"][0]
    assert entry["sample_rate"] == 1.0 and entry["steps"] == 1
    assert entry["local_noise_multiplier"] == pytest.approx(entry["noise_multiplier"] / np.sqrt(4 - 1))
    assert ledger.local_floor_epsilon() > ledger.epsilon() > 0
    view = row.sites["site-000"]
    assert view.epsilon == pytest.approx(ledger.epsilon())
    assert view.local_epsilon == pytest.approx(ledger.local_floor_epsilon())
    priv = summary.privacy
    assert (priv.mode, priv.min_sites, priv.colluders) == ("distributed", 4, 1)
    assert priv.max_local_epsilon > priv.max_epsilon > 0


def test_a_site_dropping_out_mid_round_is_masked_out_and_the_rest_is_summed(tmp_path):
    """Five sites, min_sites 4: one dies after sharing keys; SecAgg+ rebuilds its masks from the others' shares."""
    scen, out = _distributed(tmp_path), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message):
        if node == 5 and _stage(msg) == Stage.COLLECT_MASKED_VECTORS:
            return None  # the site goes silent after the key exchange
        return honest(node, msg)

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    rows = read_rows(out / "metrics.jsonl")
    assert summary.status == "completed"
    assert all(r.accepted == 4 and r.model_kept is None for r in rows)
    assert summary.final_accuracy > summary.initial["accuracy"]


def _stage(msg: Message) -> str | None:
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE))


def _two_sites_vanish_after_the_key_exchange(scen: Path, out: Path) -> tuple[RecordingGrid, dict]:
    """Run one round in which sites 4 and 5 go silent when asked for their masked vectors."""
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message):
        if node in (4, 5) and _stage(msg) == Stage.COLLECT_MASKED_VECTORS:
            return None
        return honest(node, msg)

    grid = RecordingGrid(nodes, respond)
    _coordinator(grid, rc)
    return grid, rc


def test_fewer_sites_than_min_sites_are_never_unmasked_even_by_a_coordinator_that_tries(tmp_path, monkeypatch):
    """Two of five sites vanish after the key exchange (3 < min_sites 4). The coordinator's guard keeps the sum masked; a
    coordinator without the guard asks anyway and every site withholds its key shares, so the masks stay on."""
    scen = _distributed(tmp_path, rounds=1)
    grid, _ = _two_sites_vanish_after_the_key_exchange(scen, tmp_path / "out")
    (row,) = read_rows(tmp_path / "out" / "metrics.jsonl")
    assert row.model_kept is not None and "min_sites 4" in row.model_kept
    assert not [r for r in grid.replies if _stage_of_reply(r) == "unmask"]  # never asked for key shares

    # the curious coordinator: skip fedseek's guard and run Flower's unmask stage on 3 sites
    monkeypatch.setattr(GuardedSecAggPlus, "unmask_stage", lambda self, g, c, s: super(GuardedSecAggPlus, self).unmask_stage(g, c, s))
    grid2, _ = _two_sites_vanish_after_the_key_exchange(scen, tmp_path / "out2")
    (row2,) = read_rows(tmp_path / "out2" / "metrics.jsonl")
    assert row2.model_kept is not None  # nothing was unmasked
    withheld = [r for r in grid2.replies if r.has_error() and "key shares withheld" in r.error.reason]
    assert len(withheld) == 3


def _stage_of_reply(reply: Message) -> str | None:
    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return None
    return "unmask" if Key.SHARE_LIST in reply.content.config_records[RECORD_KEY_CONFIGS] else "other"


def test_key_shares_below_the_threshold_rebuild_nothing():
    """The threshold fedseek asks for is above the colluders, and fewer shares than it do not rebuild a site's mask seed."""
    for sites, colluders in [(3, 0), (5, 1), (20, 2), (20, 12)]:
        t = share_threshold(sites, colluders)
        assert colluders < t < sites and t >= sites // 2 + 1 or t == sites - 1
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[:3]) == secret
    try:
        rebuilt = combine_shares(shares[:2])
    except ValueError:  # Flower's Shamir refuses when the shares do not determine a secret
        rebuilt = None
    assert rebuilt != secret


def test_a_distributed_site_refuses_to_train_in_the_clear(tmp_path):
    """A plain (non-secure) TRAIN message to a site whose policy is distributed is refused, never answered with an update."""
    scen = _distributed(tmp_path, rounds=1, secure_aggregation={"enabled": True, "min_sites": 4})
    rc = _run_config(scen, tmp_path / "out")
    from fedseek.runtime.global_model import GlobalModel
    from fedseek.runtime.task import model_meta, scenario_task
    from fedseek.wire.records import RoundConfig
    from fedseek.wire.transfer import from_record, pack_global

    cfg = load_scenario(scen)
    task = scenario_task(cfg)
    gm = GlobalModel(cfg, task.input_shape, task.num_classes)
    records, _ = pack_global(from_record(gm.record()), None, "none")
    rcfg = RoundConfig(server_round=1, num_rounds=1, lr=0.1, local_epochs=1, batch_size=8, model=model_meta(cfg, task), seed=7)
    msg = Message(content=RecordDict({**records, "config": rcfg.to_record()}), dst_node_id=1, message_type=MessageType.TRAIN)
    reply = in_process_sites(rc, [1])(1, msg)
    assert "update" not in reply.content.array_records
    assert "only inside secure aggregation" in str(reply.content.config_records["status"]["refused"])


@pytest.mark.parametrize(("over", "message"), [
    ({"strategy": {"name": "krum", "min_sites": 4}}, "needs each site's update"),
    ({"compression": {"codec": "int8"}}, "compression.codec"),
    ({"num_sites": 5, "strategy": {"min_sites": 4, "fraction_train": 0.5}}, "exceeds the ~2 sites sampled"),
    ({"secure_aggregation": {"min_sites": 3}, "strategy": {"min_sites": 3}}, "every site would refuse"),
    ({"privacy": {**PRIVACY, "distributed": {"min_sites": 4, "colluders": 4}}}, "colluders"),
])
def test_distributed_settings_that_cannot_work_are_refused_in_one_line(tmp_path, over, message):
    base = {"num_sites": 5, "rounds": 1, "strategy": {"min_sites": 4}, "privacy": PRIVACY}
    cfg = {**base, **over}
    path = _scenario(tmp_path, **cfg)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert message in str(err.value) and "\n" not in str(err.value).strip()


def test_secure_aggregation_without_distributed_sites_is_refused(tmp_path):
    path = _scenario(tmp_path, num_sites=5, rounds=1, strategy={"min_sites": 4}, secure_aggregation={"min_sites": 4})
    with pytest.raises(ConfigError, match="privacy.mode: distributed"):
        load_scenario(path)


def test_the_guard_halts_without_context():
    """GuardedSecAggPlus refuses to unmask below min_sites before touching the Grid."""

    class S:
        active_node_ids = {1, 2}

    wf = GuardedSecAggPlus({}, 3, num_shares=3, reconstruction_threshold=2)
    assert wf.unmask_stage(None, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), S()) is False
    assert "min_sites 3" in wf.halted


def test_a_byzantine_site_inside_the_sum_spoils_rounds_but_cannot_steer_past_the_bound(tmp_path):
    """The coordinator sees only the sum: a site scaling its values 1e4 x is not screened out, but SecAgg+'s clipping
    range caps each value and validation.max_update_norm rejects the sum's step, so the model is kept; honest sites
    under the same bound are aggregated."""
    faults = {"byzantine": {"fraction": 0.2, "attack": "scale", "scale": 1e4}}
    bound = {"max_update_norm": 1.0}
    scen, out = _distributed(tmp_path, faults=faults, validation=bound), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    summary = _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    rows = read_rows(out / "metrics.jsonl")
    assert all(r.model_kept is not None and "max_update_norm" in r.model_kept for r in rows)
    assert summary.final_accuracy == summary.initial["accuracy"]
    honest_out = tmp_path / "honest"
    scen2 = _scenario(tmp_path / "h" if (tmp_path / "h").mkdir() is None else tmp_path, num_sites=5, rounds=2,
                      strategy={"min_sites": 4}, privacy=PRIVACY, validation=bound)
    rc2 = _run_config(scen2, honest_out)
    _coordinator(FakeGrid(nodes, in_process_sites(rc2, nodes)), rc2)
    assert all(r.model_kept is None and r.accepted == 5 for r in read_rows(honest_out / "metrics.jsonl"))


def _stage_index(msg: Message) -> int | None:
    stage = _stage(msg)
    return Stage.all().index(stage) if stage in Stage.all() else None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_site_sending_malformed_protocol_replies_cannot_crash_the_run(tmp_path, stage):
    """Site 5 answers one SecAgg+ stage with garbage: a missing public key, shares for a node outside the round, a masked
    vector of the wrong shape, key shares that rebuild nothing. The run always completes. In the first three stages the
    site counts as dropped (rejected, named) and the other four are summed (a drop-out before the key exchange completes
    is taken out of the round; Flower's workflow alone would fail it); with bad shares the round keeps the previous
    model."""
    scen, out = _distributed(tmp_path, rounds=1), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message):
        reply = honest(node, msg)
        if node != 5 or reply.has_error() or _stage_index(msg) != stage:
            return reply
        cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
        if stage == 0:
            del cfg[Key.PUBLIC_KEY_1]
        elif stage == 1:
            cfg[Key.DESTINATION_LIST] = [999] * len(cfg[Key.DESTINATION_LIST])
        elif stage == 2:
            cfg[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(np.zeros(3, np.int64))]
        else:
            cfg[Key.SHARE_LIST] = [bytes(len(b)) for b in cfg[Key.SHARE_LIST]]
        return reply

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    (row,) = read_rows(out / "metrics.jsonl")
    assert summary.rounds_completed == 1
    if stage < 3:
        assert row.accepted == 4 and row.model_kept is None
    else:
        assert row.model_kept is not None
        assert summary.final_accuracy == summary.initial["accuracy"]
    if stage < 3:
        assert [r.site for r in row.rejections] == ["site-004"] and f"stage {stage}" in row.rejections[0].reason


def test_a_well_formed_but_wrong_masked_vector_is_caught_by_the_range_of_the_sum(tmp_path):
    """Site 5 sends random integers of the right shapes for its masked vector: the masks no longer cancel, the unmasked
    'mean' is noise spread over SecAgg+'s whole ring, and the coordinator discards it (an honest mean lies within the
    clipping range) instead of making it the global model."""
    scen, out = _distributed(tmp_path, rounds=1), tmp_path / "out"
    rc, nodes = _run_config(scen, out), [1, 2, 3, 4, 5]
    honest = in_process_sites(rc, nodes)
    rng = np.random.default_rng(0)

    def respond(node: int, msg: Message):
        reply = honest(node, msg)
        if node == 5 and not reply.has_error() and _stage_index(msg) == 2:
            cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
            arrays = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
            forged = [arrays[0]] + [rng.integers(0, 2**32, size=a.shape, dtype=np.int64).astype(a.dtype) for a in arrays[1:]]
            cfg[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in forged]
        return reply

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    (row,) = read_rows(out / "metrics.jsonl")
    assert row.model_kept is not None and "outside SecAgg+'s range" in row.model_kept
    assert summary.final_accuracy == summary.initial["accuracy"]


def test_sites_out_of_budget_refuse_inside_the_protocol_and_are_excluded(tmp_path):
    """Planned for one round, every site's budget is spent after it: in round 2 each refuses from inside the secure round
    (its refusal travels as a named error reply), nothing is unmasked, the sites are excluded and the run stops."""
    privacy = {**PRIVACY, "planning_rounds": 1, "epsilon_budget": 1.0}
    scen = _scenario(tmp_path, num_sites=5, rounds=3, strategy={"min_sites": 4}, privacy=privacy)
    out = tmp_path / "out"
    rc, nodes = {**_run_config(scen, out), "state-dir": str(tmp_path / "state")}, [1, 2, 3, 4, 5]
    summary = _coordinator(FakeGrid(nodes, in_process_sites(rc, nodes)), rc)
    rows = read_rows(out / "metrics.jsonl")
    assert rows[0].accepted == 5 and rows[0].model_kept is None
    assert rows[1].refused == 5 and rows[1].accepted == 0 and rows[1].model_kept is not None
    assert all("epsilon" in r.reason or "budget" in r.reason for r in rows[1].refusals), rows[1].refusals
    assert len(summary.excluded_sites) == 5 and summary.rounds_completed == 2
    assert summary.privacy.max_epsilon <= 1.0
