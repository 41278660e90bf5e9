"""A reply's site is its sender's identity, never a name it writes (fake Grid, no Flower processes).

Deployment (registered `sites`): the identity is the site whose registered key Flower
authenticated for the node (`grid.get_nodes()` carries each node's public key), and no QUERY is
sent. Simulation: the node's first QUERY answer. Either way a reply naming another site is
rejected as `impersonation` and the named site is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fedseek.outputs.schema import read_rows
from fedseek.runtime.coordinator import run_coordinator
from fedseek.wire.records import CONFIG, METRICS, SITE, RefusalMetrics, refusal_content, site_record
from tests.test_coordinator import FakeGrid, Responder, _run_config, _scenario, _task_identity, in_process_sites  # noqa: F401

SITES = ("site-000", "site-001", "site-002")


def _keypair() -> tuple[bytes, bytes]:
    """A site's public key as Flower's NodeInfo carries it (PEM SPKI) and as `fedseek certs add-site` writes it (OpenSSH)."""
    pub = ec.generate_private_key(ec.SECP384R1()).public_key()
    return (pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


class KeyGrid(FakeGrid):
    """A fake Grid that also lists each node with the public key its SuperNode authenticated with (as Flower 1.41's Grid does)."""

    def __init__(self, nodes: list[int], respond: Responder, keys: dict[int, bytes]) -> None:
        super().__init__(nodes, respond)
        self.keys = keys

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys[n], status="online") for n in self.nodes]


def _deployment(tmp: Path, nodes: list[int], *, extra_nodes: tuple[int, ...] = ()) -> tuple[dict, dict, dict[int, bytes]]:
    """A coordinator config registering SITES (one key each), the matching in-process site run config, and node -> PEM key."""
    scen = _scenario(tmp)  # the in-process sites: partition i of the same breast_cancer split names itself site-00i
    keys: dict[int, bytes] = {}
    sites = []
    for node, name in zip(nodes, SITES, strict=True):
        pem, openssh = _keypair()
        (tmp / f"{name}.pub").write_bytes(openssh)
        keys[node] = pem
        sites.append({"name": name, "public_key": f"{name}.pub"})
    for node in extra_nodes:  # a node whose key no site registered
        keys[node] = _keypair()[0]
    coord = {
        "name": "deployed-unit", "seed": 7, "rounds": 2,
        "task": {"dataset": "breast_cancer", "test_fraction": 0.25},
        "model": {"kind": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "min_sites": 3},
        "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 32},
        "round_timeout_s": 5, "node_wait_s": 5, "sites": sites, "expected_sites": 3, "out_dir": str(tmp / "out"),
    }
    path = tmp / "coordinator.yaml"
    path.write_text(yaml.safe_dump(coord))
    rc = {"config-path": str(path), "config-kind": "coordinator", "out-dir": str(tmp / "out"), "state-dir": "", "resume": False}
    return rc, _run_config(scen, tmp / "sites-out"), keys


def _coordinator(grid: FakeGrid, rc: dict):
    return run_coordinator(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))


def _audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_deployed_sites_are_named_by_their_registered_key_and_never_queried(tmp_path):
    nodes = [11, 12, 13]
    rc, site_rc, keys = _deployment(tmp_path, nodes, extra_nodes=(14,))
    honest = in_process_sites(site_rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        reply = honest(node, msg)
        if node == 13:
            del reply.content[SITE]  # a reply naming nobody: still site-002, by its key
        return reply

    grid = KeyGrid([*nodes, 14], respond, keys)
    summary = _coordinator(grid, rc)
    out = tmp_path / "out"
    assert summary.status == "completed" and summary.rounds_completed == 2
    assert not [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]  # identity from keys: no QUERY round trip
    assert 14 not in {int(m.metadata.dst_node_id) for m in grid.sent}  # an unregistered key is never used
    rows = read_rows(out / "metrics.jsonl")
    assert all(set(r.sites) == set(SITES) and r.accepted == 3 for r in rows)
    events = _audit(out)
    joined = {(e["site"], e["node_id"], e["identity"]) for e in events if e["event"] == "site_joined"}
    assert joined == {("site-000", 11, "key"), ("site-001", 12, "key"), ("site-002", 13, "key")}
    assert [e["node_id"] for e in events if e["event"] == "unknown_node"] == [14]


def test_replies_naming_another_site_are_rejected_and_the_named_site_is_untouched(tmp_path):
    """site-001 refuses in site-000's name, site-002 sends its update in site-000's name: both rejected, site-000 unaffected."""
    nodes = [11, 12, 13]
    rc, site_rc, keys = _deployment(tmp_path, nodes)
    honest = in_process_sites(site_rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        if node == 12 and msg.metadata.message_type == MessageType.TRAIN:
            return Message(refusal_content("budget spent", RefusalMetrics(num_examples=5, epsilon=9.0), "site-000"), reply_to=msg)
        reply = honest(node, msg)
        if node == 13:
            reply.content[SITE] = site_record("site-000")
        return reply

    summary = _coordinator(KeyGrid(nodes, respond, keys), rc)
    out = tmp_path / "out"
    assert summary.excluded_sites == {}  # nobody excluded: the forged refusal counted for nothing
    p0 = summary.privacy.sites["site-000"]
    assert p0.rounds_trained == 2 and p0.refusals == 0 and p0.epsilon is None  # no forged epsilon 9.0 blamed on site-000
    assert set(summary.privacy.sites) == {"site-000"}
    rows = read_rows(out / "metrics.jsonl")
    for r in rows:
        assert (r.sampled, r.accepted, r.rejected, r.refused) == (3, 1, 2, 0)  # the impostors are asked again (not excluded)
        assert sorted(x.site for x in r.rejections) == ["site-001", "site-002"]
        assert all(x.reason.startswith("impersonation: reply names site 'site-000'") for x in r.rejections)
    events = _audit(out)
    imp = [e for e in events if e["event"] == "impersonation"]
    assert sorted((e["round"], e["site"], e["claimed"]) for e in imp) == [
        (1, "site-001", "site-000"), (1, "site-002", "site-000"), (2, "site-001", "site-000"), (2, "site-002", "site-000")]
    about_000 = {e["event"] for e in events if e.get("site") == "site-000"}
    assert about_000 == {"site_joined"}  # no refusal, rejection or failure was ever recorded against site-000
    assert summary.status == "completed" and [r.site for r in summary.rejections] == ["site-001", "site-002"] * 2


def test_simulation_query_answer_naming_a_taken_site_is_impersonation(tmp_path):
    """Node 2 answers the QUERY as site-000 (node 1's): it stays unidentified, and its updates are rejected."""
    scen = _scenario(tmp_path)
    rc, nodes = _run_config(scen, tmp_path / "out"), [1, 2, 3]
    honest = in_process_sites(rc, nodes)

    def respond(node: int, msg: Message) -> Message | None:
        if node == 2 and msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({SITE: site_record("site-000")}), reply_to=msg)
        return honest(node, msg)

    summary = _coordinator(FakeGrid(nodes, respond), rc)
    events = _audit(tmp_path / "out")
    imp = [(e["message"], e["site"], e["claimed"]) for e in events if e["event"] == "impersonation"]
    assert imp == [("query", "node-2", "site-000"), ("train", "node-2", "site-001"), ("train", "node-2", "site-001")]
    assert summary.privacy.sites["site-000"].rounds_trained == 2 and "site-001" not in summary.privacy.sites
    assert [(r.accepted, r.rejected) for r in read_rows(tmp_path / "out" / "metrics.jsonl")] == [(2, 1), (2, 1)]


def test_evaluation_reply_naming_another_site_is_rejected():
    from fedseek.runtime.federated_eval import FederatedEvaluator
    from fedseek.runtime.nodes import NodeTracker
    from fedseek.wire.records import EvalMetrics, ModelMeta

    good = EvalMetrics(class_counts=[10.0, 10.0], class_correct=[8.0, 9.0], loss_sum=5.0, num_examples=20, noise_std=0.0, loss_clip=10.0)

    def respond(node: int, msg: Message) -> Message | None:
        return Message(RecordDict({SITE: site_record(f"site-{node}")}), reply_to=msg)

    grid = FakeGrid([1, 2], respond)
    audit: list[tuple[str, dict]] = []
    nodes = NodeTracker(grid, "1", lambda event, **kw: audit.append((event, kw)), node_wait_s=1, query_timeout_s=1)
    nodes.discover([1, 2])
    ev = FederatedEvaluator(grid, nodes, lambda *a, **k: None, meta=ModelMeta(kind="mlp", input_shape=[3], num_classes=2), run_id="1",
                            timeout_s=1)
    msgs = []
    for n in (1, 2):
        m = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.EVALUATE)
        m.metadata.__dict__["_message_id"] = f"e-{n}"
        msgs.append(m)
    replies = [Message(RecordDict({METRICS: good.to_record(), SITE: site_record("site-1")}), reply_to=m) for m in msgs]
    sites, answers = ev.collect(msgs, replies)
    assert sites["site-1"].status == "evaluated" and answers == [good]
    assert sites["site-2"].status == "rejected" and sites["site-2"].reason.startswith("impersonation: reply names site 'site-1'")
    assert [(e, kw["site"], kw["claimed"], kw["message"]) for e, kw in audit if e == "impersonation"] == [
        ("impersonation", "site-2", "site-1", "evaluate")]


def test_backoff_doubles_up_to_the_cap_and_an_answer_resets_it():
    from fedseek.runtime.identity import Backoff

    b = Backoff(cap_rounds=4)
    skips = [b.missed("a", rnd)[1] for rnd in (1, 3, 6, 11, 16)]
    assert skips == [1, 2, 4, 4, 4]
    assert b.skipping("a", 20) and not b.skipping("a", 21)
    again = Backoff(cap_rounds=4)
    again.load_state_dict(json.loads(json.dumps(b.state_dict())))  # checkpointed as plain data
    assert again.misses == {"a": 5} and again.skipping("a", 20)
    b.answered("a")
    assert not b.skipping("a", 17) and b.missed("a", 17) == (1, 1)


def test_site_keys_are_read_from_openssh_files_and_match_flower_pem(tmp_path):
    from fedseek.config import load_coordinator
    from fedseek.ops.daemons import DeployError
    from fedseek.ops.registration import load_site_keys
    from fedseek.runtime.identity import SiteKeys
    from fedseek.wire.identity import KeyFileError, pem_spki, read_site_keys

    pem, openssh = _keypair()
    (tmp_path / "a.pub").write_bytes(openssh)
    keys = read_site_keys([("hospital-a", tmp_path / "a.pub")])
    assert keys == {"hospital-a": pem_spki(pem)} and SiteKeys(keys).site_of(pem) == "hospital-a"
    assert SiteKeys(keys).site_of(_keypair()[0]) is None and SiteKeys(keys).site_of(b"not a key") is None
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(rsa_pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    (tmp_path / "junk.pub").write_text("hello")
    for file, words in (("missing.pub", "No such file"), ("rsa.pub", "ECDSA key on a NIST curve"), ("junk.pub", "not an OpenSSH")):
        with pytest.raises(KeyFileError, match=f"site hospital-b: .*{words}"):
            read_site_keys([("hospital-b", tmp_path / file)])
    rc, _, _ = _deployment(tmp_path, [1, 2, 3])
    (tmp_path / "site-001.pub").write_text("hello")
    with pytest.raises(DeployError, match="site site-001: .*not an OpenSSH") as info:  # the operator tooling: exit 2
        load_site_keys(load_coordinator(rc["config-path"]))
    assert info.value.exit_code == 2
    from fedseek.runtime.task import plan_from_context

    with pytest.raises(KeyFileError, match="site site-001"):  # the ServerApp refuses to run with an unreadable registered key
        plan_from_context(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
