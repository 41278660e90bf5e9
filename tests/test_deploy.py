"""Real deployment on 127.0.0.1: coordinator (SuperLink, TLS, site keys) + site daemons (SuperNodes), via the CLI.

One coordinator and three sites are shared by the module (one per transport: gRPC tunnel, HTTPS gateway,
direct; rounds take ~3-5 s with fedseek's poll and warm ClientApps). Every process is stopped by its pidfile pid in the
fixtures' finally blocks, also when a test fails.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedseek.config import load_coordinator, load_site
from fedseek.ops import coordinator, daemons, pki
from fedseek.ops.flower_control import flower_env, flwr_bin, write_connection
from fedseek.ops.processes import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b", "site-c")


def fedseek(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the fedseek CLI as an operator would (`env`: the process environment, default this one's)."""
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def start_sites(site_cfgs: list[Path], envs: list[dict[str, str] | None] | None = None, wait_s: int = 60) -> None:
    """`fedseek site start --wait` for every site at once (their operators start them independently); each must come online."""
    procs = [subprocess.Popen([sys.executable, "-m", "fedseek", "site", "start", "--config", str(c), "--wait", str(wait_s)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=(envs or [None] * len(site_cfgs))[i])
             for i, c in enumerate(site_cfgs)]
    for p in procs:
        _, err = p.communicate(timeout=wait_s + 60)
        assert p.returncode == 0 and "online as node" in err, err


def stop_sites(site_cfgs: list[Path], timeout: int = 120) -> None:
    """`fedseek site stop` for every site at once (as their operators would; one after the other costs a few seconds each)."""
    procs = [subprocess.Popen([sys.executable, "-m", "fedseek", "site", "stop", "--config", str(c)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in site_cfgs]
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def breast_cancer_csvs(root: Path, n_sites: int) -> tuple[list[Path], Path]:
    """Site tables and a central test table with a named label column, written like a hospital would have them."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer(as_frame=True)
    df = raw.frame.rename(columns={"target": "diagnosis"})
    df["diagnosis"] = np.where(df["diagnosis"] == 1, "benign", "malignant")
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    test, train = df.iloc[:140], df.iloc[140:]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(train)), n_sites)):
        p = root / f"site{i}.csv"
        train.iloc[part].to_csv(p, index=False)
        paths.append(p)
    test_path = root / "test.csv"
    test.to_csv(test_path, index=False)
    return paths, test_path


def coordinator_yaml(path: Path, certs: Path, port: int, state: Path, sites: list[str], test_csv: Path | None = None,
                     gateway_port: int | None = None, transport: str = "grpc", superlink_port: int | None = None) -> Path:
    """A coordinator config; `port` is where sites connect: the gRPC endpoint (transport grpc, the SuperLink then on
    `superlink_port`, default a free loopback port) or the SuperLink itself (transport https)."""
    sl_port = port if transport == "https" else (superlink_port or free_port())
    return write_yaml(path, {
        "transport": transport,
        **({"gateway": {"host": "127.0.0.1", "port": gateway_port}} if gateway_port else {}),
        **({"endpoint": {"host": "127.0.0.1", "port": port}} if transport == "grpc" else {}),
        "name": "deploy-test", "seed": 1, "rounds": 2,
        "task": {"test_file": str(test_csv), "label_column": "diagnosis", "classes": ["benign", "malignant"]} if test_csv
        else {"input_shape": [30], "num_classes": 2},
        "model": {"kind": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "min_sites": max(1, len(sites))},
        "train": {"local_epochs": 1, "lr": 0.1, "batch_size": 16},
        "round_timeout_s": 120,
        "superlink": {"host": "127.0.0.1", "port": sl_port, "certs_dir": str(certs), "state_dir": str(state)},
        "sites": [{"name": s, "public_key": str(certs / "sites" / s / f"{s}.pub")} for s in sites],
        "expected_sites": max(1, len(sites)), "node_wait_s": 120,
        "out_dir": str(state.parent / "out"),
        "privacy": {"epsilon_budget": 8.0, "delta": 1e-5},
    })


def site_yaml(path: Path, name: str, port: int, certs: Path, data: Path, state: Path, *, ca: Path | None = None,
              key: Path | None = None, label: str = "diagnosis", retries: int | None = None, transport: str = "grpc") -> Path:
    """A site config; with transport grpc it runs its site proxy on a free loopback port with the bundle's certificate."""
    bundle = certs / "sites" / name
    cfg = {
        "name": name, "coordinator": f"127.0.0.1:{port}", "transport": transport,
        "root_certificates": str(ca or bundle / "ca.crt"),
        "auth_private_key": str(key or bundle / name),
        **({"tls_certificate": str(bundle / f"{name}.crt"), "tls_private_key": str(bundle / f"{name}.tls.key"),
            "proxy_port": free_port()} if transport == "grpc" else {}),
        "data": {"path": str(data), "label_column": label, "classes": ["benign", "malignant"]},
        "privacy": {"epsilon_budget": 8.0, "delta": 1e-5, "noise_multiplier": 1.0, "grad_sample_mode": "ghost"},
        "state_dir": str(state / name), "device": "cpu", "runtime_port": free_port(),
    }
    if retries is not None:
        cfg.update(max_retries=retries, max_wait_s=15)
    return write_yaml(path, cfg)


def stop_leftovers(coord_state: Path, sites_state: Path) -> None:
    """Belt and braces after `site stop` / `coordinator stop`: no daemon of a test federation may outlive it."""
    from fedseek.ops.processes import stop_detached

    for path in [coord_state / daemons.SUPERLINK_PIDFILE, coord_state / daemons.ENDPOINT_PIDFILE,
                 coord_state / daemons.GATEWAY_PIDFILE, *sites_state.glob(f"*/{daemons.SUPERNODE_PIDFILE}"),
                 *sites_state.glob(f"*/{daemons.PROXY_PIDFILE}")]:
        pf = daemons.Pidfile.read(path)
        if pf is not None and pf.running():
            stop_detached(pf.pid, pf.started)


def status(cfg_path: Path) -> dict:
    res = fedseek("coordinator", "status", "--config", str(cfg_path), "--json", timeout=60)
    return json.loads(res.stdout)


def wait_online(cfg_path: Path, names: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    st: dict = {}
    while time.monotonic() < deadline:
        st = status(cfg_path)
        if all(s["status"] == "online" for s in st["sites"] if s["name"] in names):
            return st
        time.sleep(2)
    raise AssertionError(f"sites not online within {timeout_s}s: {st}")


# ------------------------------------------------------------------ shared federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """CA + coordinator cert, 3 registered site keys + 1 rogue, data, configs; coordinator and 3 sites running."""
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    port, gw_port, sl_port = free_port(), free_port(), free_port()
    pki.init_ca(certs, hosts=[], ips=[])
    for name in (*SITES, "rogue"):
        pki.add_site(certs, name, f"127.0.0.1:{port}")
    data, test_csv = breast_cancer_csvs(root / "data", len(SITES))
    coord = coordinator_yaml(root / "coordinator.yaml", certs, port, root / "coord", list(SITES), test_csv, gateway_port=gw_port,
                             superlink_port=sl_port)
    # every transport at once: site-a through its site proxy and the gRPC endpoint (the default), site-b through the
    # older HTTPS Fleet-only gateway, site-c straight to the loopback SuperLink
    routes = {"site-a": (port, "grpc"), "site-b": (gw_port, "https"), "site-c": (sl_port, "https")}
    site_cfgs = [site_yaml(root / f"{n}.yaml", n, routes[n][0], certs, data[i], root / "sites", transport=routes[n][1])
                 for i, n in enumerate(SITES)]
    ctx = {"root": root, "certs": certs, "port": sl_port, "ep_port": port, "gw_port": gw_port, "coord": coord,
           "sites": site_cfgs, "data": data}
    try:
        res = fedseek("coordinator", "start", "--config", str(coord))
        assert res.returncode == 0, res.stderr
        assert all(f"site {n}: key registered" in res.stderr for n in SITES), res.stderr
        assert "gateway started" in res.stderr and "endpoint started" in res.stderr, res.stderr
        start_sites(site_cfgs)
        yield ctx
    finally:
        stop_sites(site_cfgs)
        fedseek("coordinator", "stop", "--config", str(coord))
        stop_leftovers(root / "coord", root / "sites")


def test_tls_site_auth_two_rounds_with_dp(fed):
    cfg = load_coordinator(fed["coord"])
    pf = daemons.Pidfile.read(Path(cfg.superlink.state_dir) / daemons.SUPERLINK_PIDFILE)
    assert pf is not None and pf.running()
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth", "--database"):
        assert flag in pf.cmd
    assert "--insecure" not in pf.cmd
    st = wait_online(fed["coord"], SITES, 60)
    assert {s["name"] for s in st["sites"]} == set(SITES) and st["other_nodes"] == []

    out = fed["root"] / "run1"
    t0 = time.time()
    res = fedseek("run", "--config", str(fed["coord"]), "--out", str(out), timeout=400)
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr[-4000:]
    assert "round   2/2" in res.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sampled"] == 3 and r["accepted"] == 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["dataset"] == "test"
    assert summary["final_accuracy"] > 0.6
    per_site = summary["privacy"]["sites"]
    assert set(per_site) == set(SITES)
    assert all(0 < v["epsilon"] < 8.0 and v["rounds_trained"] == 2 for v in per_site.values())
    assert (out / "model.pt").exists() and (out / "checkpoint" / "state.json").exists()
    fed["run1_epsilon"] = {k: v["epsilon"] for k, v in per_site.items()}
    print(f"deployed run: 2 rounds in {wall:.1f}s wall; round seconds {[round(r['round_seconds'], 1) for r in rows]}")

    again = fedseek("coordinator", "start", "--config", str(fed["coord"]))  # idempotent: registered keys are fine
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr


def _https(port: int, method: str, path: str, ca: Path, body: bytes = b"") -> int:
    """Status of one HTTPS request to 127.0.0.1:port (trusting the federation CA)."""
    import http.client
    import ssl

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=20)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_gateway_forwards_fleet_only(fed, tmp_path):
    """Through the gateway: Control API, Swagger, traversal and non-POST are 403; the SuperLink itself is loopback-only."""
    ca = fed["certs"] / pki.CA_CRT
    gw = fed["gw_port"]
    for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("POST", "/v1/fleet/../control/list-runs"),
                         ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("GET", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/runtime/pull-app-inputs")):
        assert _https(gw, method, path, ca) == 403, (method, path)
    assert _https(gw, "POST", "/v1/fleet/get-run", ca) != 403  # a Fleet RPC reaches the SuperLink (which rejects the unsigned call)
    assert _https(fed["port"], "POST", "/v1/control/list-runs", ca) != 403  # the open Control API: loopback only
    # the operator CLI pointed at the gateway cannot list runs
    home = tmp_path / "home"
    write_connection(home, "viagw", f"127.0.0.1:{gw}", root_certificates=ca)
    res = subprocess.run([flwr_bin("flwr"), "ls", "viagw", "--format", "json"], env=flower_env(home),
                         capture_output=True, text=True, timeout=60)
    assert '"success": false' in res.stdout or res.returncode != 0, res.stdout
    assert "is not a Fleet RPC" in (fed["root"] / "coord" / "gateway.log").read_text()


def test_plaintext_client_is_refused(fed):
    """A SuperNode without TLS gets no answer from the TLS gateway and gives up."""
    log = fed["root"] / "insecure.log"
    home = fed["root"] / "insecure-home"
    env = flower_env(home)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([flwr_bin("flower-supernode"), "--superlink", f"127.0.0.1:{fed['gw_port']}", "--insecure",
                                 "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "15"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            from fedseek.ops.processes import ProcessTree

            ProcessTree(proc).stop()
    text = log.read_text()
    # the TLS gateway closes the plaintext connection: httpx says "disconnected" or "reset" depending on timing
    refused = "Server disconnected without sending a response" in text or "Connection reset by peer" in text
    assert rc != 0 and "Exit Code: 305" in text and refused, text[-2000:]


def test_client_trusting_another_ca_is_refused(fed, tmp_path):
    other = tmp_path / "other-ca"
    pki.init_ca(other, hosts=[], ips=[])
    cfg = site_yaml(tmp_path / "s.yaml", "site-a", fed["port"], fed["certs"], fed["data"][0], tmp_path / "st",
                    ca=other / pki.CA_CRT, retries=1, transport="https")
    res = fedseek("site", "start", "--config", str(cfg), "--wait", "90")
    assert res.returncode == 1, res.stderr
    assert "refused" in res.stderr and "CERTIFICATE_VERIFY_FAILED" in res.stderr, res.stderr
    assert daemons.Pidfile.read(tmp_path / "st" / "site-a" / daemons.SUPERNODE_PIDFILE) is None


def test_unregistered_site_key_is_refused(fed, tmp_path):
    cfg = site_yaml(tmp_path / "rogue.yaml", "rogue", fed["gw_port"], fed["certs"], fed["data"][0], tmp_path / "st", retries=1,
                    transport="https")
    res = fedseek("site", "start", "--config", str(cfg), "--wait", "90")
    assert res.returncode == 1, res.stderr
    assert "[code: 2004]" in res.stderr and "does not know this site's key" in res.stderr, res.stderr
    assert status(fed["coord"])["other_nodes"] == []  # the rogue key never became a node


def test_grpc_unlisted_site_certificate_is_refused_at_the_endpoint(fed, tmp_path):
    """A site certificate from the federation CA whose site is not in `sites` never reaches the SuperLink."""
    cfg = site_yaml(tmp_path / "rogue.yaml", "rogue", fed["ep_port"], fed["certs"], fed["data"][0], tmp_path / "st", retries=1)
    res = fedseek("site", "start", "--config", str(cfg), "--wait", "90")
    try:
        assert res.returncode == 1, res.stderr
        assert "refused" in res.stderr and "not in the coordinator's sites" in res.stderr, res.stderr
        assert "certificate names 'rogue', which is not in the coordinator's sites" in (fed["root"] / "coord" / "endpoint.log").read_text()
        assert status(fed["coord"])["other_nodes"] == []
    finally:
        fedseek("site", "stop", "--config", str(cfg))
    assert daemons.Pidfile.read(tmp_path / "st" / "rogue" / daemons.PROXY_PIDFILE) is None


def test_expired_coordinator_certificate_is_refused(fed, tmp_path):
    """`coordinator start` refuses it up front; a SuperLink serving one anyway is refused by the sites' TLS."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for f in (pki.CA_CRT, pki.CA_KEY):
        shutil.copy(fed["certs"] / f, certs / f)
    ca_key, ca_cert = pki.load_private_key(certs / pki.CA_KEY), pki.load_cert(certs / pki.CA_CRT)
    now = dt.datetime.now(dt.UTC)
    key, cert = pki.issue_server_cert(ca_key, ca_cert, [], [], not_valid_before=now - dt.timedelta(days=30),
                                      not_valid_after=now - dt.timedelta(days=1))
    pki.write_private_key(certs / pki.COORDINATOR_KEY, key)
    pki.write_cert(certs / pki.COORDINATOR_CRT, cert)
    port = free_port()
    coord = coordinator_yaml(tmp_path / "c.yaml", certs, port, tmp_path / "coord", [], transport="https")
    res = fedseek("coordinator", "start", "--config", str(coord))
    assert res.returncode == 2 and "expired on" in res.stderr and len(lines(res.stderr)) == 1, res.stderr

    cfg = load_coordinator(coord)
    try:
        coordinator.launch_superlink(cfg)
        site = site_yaml(tmp_path / "s.yaml", "site-a", port, fed["certs"], fed["data"][0], tmp_path / "st", retries=1,
                         transport="https")
        res = fedseek("site", "start", "--config", str(site), "--wait", "90")
        assert res.returncode == 1, res.stderr
        assert "certificate has expired" in res.stderr, res.stderr
    finally:
        coordinator.stop_coordinator(cfg)
    assert daemons.Pidfile.read(tmp_path / "coord" / daemons.SUPERLINK_PIDFILE) is None


def test_restart_with_same_database_sites_reconnect_and_new_run_works(fed):
    before = {s["name"]: s["node_id"] for s in status(fed["coord"])["sites"]}
    site_pids = {n: daemons.Pidfile.read(fed["root"] / "sites" / n / daemons.SUPERNODE_PIDFILE) for n in SITES}
    res = fedseek("coordinator", "stop", "--config", str(fed["coord"]))
    assert res.returncode == 0 and "stopped" in res.stdout
    assert status(fed["coord"])["running"] is False
    res = fedseek("coordinator", "start", "--config", str(fed["coord"]))
    assert res.returncode == 0, res.stderr
    assert all(f"site {n}: registered (node {before[n]}" in res.stderr for n in SITES), res.stderr  # from the database
    st = wait_online(fed["coord"], SITES, 120)
    assert {s["name"]: s["node_id"] for s in st["sites"]} == before  # same keys, same node ids

    # a run during which site-a's proxy and the coordinator endpoint are both killed and restarted
    out = fed["root"] / "run2"
    run = subprocess.Popen([sys.executable, "-m", "fedseek", "run", "--config", str(fed["coord"]), "--out", str(out)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(1)
        cfg_a = fed["sites"][0]
        assert daemons.stop_pidfile(fed["root"] / "sites" / "site-a" / daemons.PROXY_PIDFILE) is not None
        assert daemons.stop_pidfile(fed["root"] / "coord" / daemons.ENDPOINT_PIDFILE) is not None
        time.sleep(2)
        res = fedseek("coordinator", "start", "--config", str(fed["coord"]))
        assert res.returncode == 0 and "endpoint started" in res.stderr, res.stderr
        res = fedseek("site", "start", "--config", str(cfg_a))
        assert res.returncode == 0 and "proxy (pid" in res.stderr and "already running" in res.stderr, res.stderr
        text, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, text[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["status"] == "completed"
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["accepted"] >= 2, rows[-1]
    for _n, pf in site_pids.items():  # the same SuperNode processes reconnected by themselves (no restart)
        assert pf is not None and pf.running()
        # (Flower's "Connection successful after" log line is not always written: the same pid, the
        # same node id above and the completed run are the evidence that the site reconnected.)
    if "run1_epsilon" in fed:  # each site's ledger carried over: epsilon grew, never reset
        for name, eps in summary["privacy"]["sites"].items():
            assert eps["epsilon"] > fed["run1_epsilon"][name]


def test_revoking_a_listed_site_stops_it_without_a_coordinator_restart(fed):
    """Last on the shared federation: `certs revoke site-a` on the running endpoint; site-a's SuperNode is refused and exits."""
    ep = daemons.Pidfile.read(fed["root"] / "coord" / daemons.ENDPOINT_PIDFILE)
    node = daemons.Pidfile.read(fed["root"] / "sites" / "site-a" / daemons.SUPERNODE_PIDFILE)
    assert ep is not None and ep.running() and node is not None and node.running()
    res = fedseek("certs", "revoke", "site-a", "--certs", str(fed["certs"]))
    assert res.returncode == 0 and "revoked 1 certificate" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 120
    while node.running() and time.monotonic() < deadline:
        time.sleep(1)
    assert not node.running(), "site-a's SuperNode still runs after its certificate was revoked"
    assert "of 'site-a'" in (fed["root"] / "coord" / "endpoint.log").read_text()
    assert ep.running()  # the same endpoint process: no restart


# ------------------------------------------------------------------ bad site configs (no daemons needed)


@pytest.fixture
def site_material(tmp_path):
    certs = tmp_path / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    pki.add_site(certs, "site-a", "127.0.0.1:9092")
    data, _ = breast_cancer_csvs(tmp_path / "data", 1)
    return certs, data[0]


def _bad(tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    certs, data = kw.pop("material")
    cfg = site_yaml(tmp_path / "bad.yaml", "site-a", 9092, certs, kw.pop("data", data), tmp_path / "st", **kw)
    return fedseek("site", "start", "--config", str(cfg))


def test_bad_site_config_missing_cert(tmp_path, site_material):
    res = _bad(tmp_path, material=site_material, ca=tmp_path / "nope" / "ca.crt")
    assert res.returncode == 2 and len(lines(res.stderr)) == 1, res.stderr
    assert "root_certificates" in res.stderr and "file not found" in res.stderr


def test_bad_site_config_missing_key(tmp_path, site_material):
    res = _bad(tmp_path, material=site_material, key=tmp_path / "nope")
    assert res.returncode == 2 and len(lines(res.stderr)) == 1, res.stderr
    assert "auth_private_key" in res.stderr and "file not found" in res.stderr


def test_bad_site_config_unreadable_data(tmp_path, site_material):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    res = _bad(tmp_path, material=site_material, data=broken)
    assert res.returncode == 2 and len(lines(res.stderr)) == 1, res.stderr
    assert "data:" in res.stderr and "cannot read as Parquet" in res.stderr
    res = _bad(tmp_path, material=site_material, data=tmp_path / "missing.csv")
    assert res.returncode == 2 and len(lines(res.stderr)) == 1 and "file not found" in res.stderr, res.stderr


def test_bad_site_config_wrong_label_column(tmp_path, site_material):
    res = _bad(tmp_path, material=site_material, label="outcome")
    assert res.returncode == 2 and len(lines(res.stderr)) == 1, res.stderr
    assert "label column 'outcome' not found" in res.stderr and "diagnosis" in res.stderr
    assert not (tmp_path / "st" / "site-a" / daemons.SUPERNODE_PIDFILE).exists()  # nothing was started


def test_example_configs_validate():
    """The shipped coordinator and site configs parse, and site paths resolve next to the repo's certs/."""
    for name in ("coordinator.yaml", "coordinator-banks.yaml"):
        cfg = load_coordinator(ROOT / "server" / name)
        assert cfg.superlink.host == "127.0.0.1" and len(cfg.sites) == 2
    for name in ("hospital-a", "hospital-b", "bank-a", "bank-b"):
        site = load_site(ROOT / "clients" / "sites" / f"{name}.yaml")
        assert site.name == name and site.privacy is not None and site.privacy.enabled
        assert Path(site.auth_private_key) == ROOT / "certs" / "sites" / name / name
