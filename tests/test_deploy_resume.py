"""A deployed run survives a SuperLink crash: `kill -9` of the coordinator's SuperLink mid-run, `coordinator start`,
then `fedseek run --resume` ends with exactly the model of an uninterrupted run.

Own tiny federation on 127.0.0.1 (SuperLink over TLS with site keys, two site daemons, DP off so
that training is reproducible, a 16-unit MLP, 2 rounds), all through the `fedseek` CLI. The lost
SuperLink must cost `fedseek run` one error line (no traceback) that says how to continue. Every
process is stopped by pid in the fixture's finally block, including what the killed SuperLink left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fedseek.ops import daemons, pki
from fedseek.ops.processes import ProcessTree, free_port, is_running, stop_detached
from tests.conftest import ROOT
from tests.test_deploy import breast_cancer_csvs, coordinator_yaml, fedseek, lines, site_yaml, stop_leftovers, stop_sites, wait_online
from tests.test_site_loss import _session_members

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b")


@pytest.fixture
def tiny_fed(tmp_path):
    """Coordinator (2 rounds, no DP at the sites) and two running sites."""
    certs = tmp_path / "certs"
    port = free_port()
    pki.init_ca(certs, hosts=[], ips=[])
    for name in SITES:
        pki.add_site(certs, name, f"127.0.0.1:{port}")
    data, test_csv = breast_cancer_csvs(tmp_path / "data", len(SITES))
    coord = coordinator_yaml(tmp_path / "coordinator.yaml", certs, port, tmp_path / "coord", list(SITES), test_csv)
    cfg = yaml.safe_load(coord.read_text())
    cfg.update(rounds=2, round_timeout_s=60, node_wait_s=90)
    cfg.pop("privacy")
    coord.write_text(yaml.safe_dump(cfg, sort_keys=False))
    site_cfgs = []
    for i, name in enumerate(SITES):
        path = site_yaml(tmp_path / f"{name}.yaml", name, port, certs, data[i], tmp_path / "sites")
        scfg = yaml.safe_load(path.read_text())
        scfg.pop("privacy")  # no DP: the sites' training is a function of the seed, so two runs can be compared exactly
        path.write_text(yaml.safe_dump(scfg, sort_keys=False))
        site_cfgs.append(path)
    ctx = {"root": tmp_path, "coord": coord, "leftovers": {}}
    try:
        res = fedseek("coordinator", "start", "--config", str(coord))
        assert res.returncode == 0, res.stderr
        starts = [subprocess.Popen([sys.executable, "-m", "fedseek", "site", "start", "--config", str(c), "--wait", "60"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in site_cfgs]
        for p in starts:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "online as node" in err, err
        yield ctx
    finally:
        stop_sites(list(site_cfgs))
        fedseek("coordinator", "stop", "--config", str(coord))
        stop_leftovers(tmp_path / "coord", tmp_path / "sites")
        for pid, started in ctx["leftovers"].items():  # what the killed SuperLink left in its session (SuperExec, ServerApp)
            if is_running(pid, started):
                stop_detached(pid, started, timeout_s=5)


def _model(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def _kill_superlink_after_round_1(ctx: dict, out) -> subprocess.CompletedProcess:
    """Start `fedseek run`, SIGKILL the SuperLink once round 1 is checkpointed, return the run command's result."""
    pf = daemons.Pidfile.read(ctx["root"] / "coord" / daemons.SUPERLINK_PIDFILE)
    assert pf is not None and pf.running()
    proc = subprocess.Popen([sys.executable, "-m", "fedseek", "run", "--config", str(ctx["coord"]), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree = ProcessTree(proc, "fedseek-run")
    state = out / "checkpoint" / "state.json"
    try:
        deadline = time.monotonic() + 240
        while not (state.exists() and json.loads(state.read_text())["round"] >= 1):
            assert proc.poll() is None, f"fedseek run ended before round 1: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no round-1 checkpoint within 240 s"
            tree.sample()
            time.sleep(0.1)
        ctx["leftovers"].update(_session_members(pf.pid, pf.started))
        os.kill(pf.pid, signal.SIGKILL)
        ctx["leftovers"].update(_session_members(pf.pid, pf.started))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            tree.stop()
    assert json.loads(state.read_text())["round"] == 1  # killed mid-run: round 2 never completed
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_kill_9_superlink_then_run_resume_gives_the_uninterrupted_model(tiny_fed):
    wait_online(tiny_fed["coord"], SITES, 60)
    straight = tiny_fed["root"] / "straight"
    res = fedseek("run", "--config", str(tiny_fed["coord"]), "--out", str(straight), timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]

    out = tiny_fed["root"] / "crashed"
    crashed = _kill_superlink_after_round_1(tiny_fed, out)
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "Traceback" not in crashed.stderr, crashed.stderr[-3000:]
    last = lines(crashed.stderr)[-1]
    assert last.startswith("error: ") and "--resume" in last, crashed.stderr[-3000:]
    assert ("lost the SuperLink" in last or "exited" in last), last
    print(f"fedseek run after kill -9 of the SuperLink: exit {crashed.returncode}, last stderr line: {last}")
    assert not (out / "summary.json").exists()

    res = fedseek("coordinator", "start", "--config", str(tiny_fed["coord"]))  # same database: same keys, same node ids
    assert res.returncode == 0, res.stderr
    wait_online(tiny_fed["coord"], SITES, 120)
    res = fedseek("run", "--config", str(tiny_fed["coord"]), "--out", str(out), "--resume", timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from" in res.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["accepted"] == 2 for r in rows)  # nothing repeated, nothing lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    audit = [json.loads(ln) for ln in (out / "audit.jsonl").read_text().splitlines()]
    assert [e["round"] for e in audit if e["event"] == "resumed"] == [1]
    a, b = _model(straight), _model(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
