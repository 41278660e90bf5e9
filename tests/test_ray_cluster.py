"""`fedseek simulate --ray-address`: the virtual sites run on an existing two-node Ray cluster, with the single-machine result.

The test starts the cluster itself (Ray's own multi-node test harness, ray.cluster_utils: a head
and a second node on this machine, 1 CPU each, bound to 127.0.0.1, processes the test stops), runs
the same seeded non-DP scenario on the cluster and on one machine (the coordinator with the real
ClientApp in-process, as the fast tier runs it: no second Ray to start), and reads from Ray's actor
table (the GCS, Ray's state) that virtual sites ran on both nodes. fedseek must neither start nor
stop the cluster: it is still up, with both nodes, after the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.test_coordinator import run_in_process

LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SCENARIO = {
    "name": "cluster", "seed": 3, "num_sites": 4, "rounds": 3,
    "data": {"dataset": "breast_cancer", "test_fraction": 0.25}, "partition": {"scheme": "iid"},
    "model": {"kind": "mlp", "hidden": [16]}, "strategy": {"name": "fedavg", "min_sites": 4},
    "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 32}, "round_timeout_s": 120,
}


@pytest.fixture(scope="module")
def cluster():
    """Two nodes on 127.0.0.1 only: Ray binds to the machine's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read
    at import, so the constant is patched too for a worker that imported Ray already); the simulations inherit it."""
    import ray._private.ray_constants as constants
    from ray.cluster_utils import Cluster

    old = os.environ.get(LOOPBACK), constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK], constants.ENABLE_RAY_CLUSTER = "0", False
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:"), c.address
        yield c
    finally:
        c.shutdown()
        constants.ENABLE_RAY_CLUSTER = old[1]
        if old[0] is None:
            os.environ.pop(LOOPBACK, None)
        else:
            os.environ[LOOPBACK] = old[0]


def _actor_nodes(address: str) -> set[str]:
    """Node ids that ran Flower's ClientApp actors, from the GCS actor table."""
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        from ray._private.state import actors

        return {a["Address"]["NodeID"] for a in actors().values() if a["ActorClassName"] == "ClientAppActor"}
    finally:
        ray.shutdown()


def _with_site_tables(tmp: Path) -> dict:
    """SCENARIO on four hospitals' own CSV files (the Ray path of data.tables: each worker loads its site's file)."""
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    test, train = bc.iloc[:140], bc.iloc[140:]
    names = []
    for i, part in enumerate(np.array_split(np.arange(len(train)), 4)):
        train.iloc[part].to_csv(tmp / f"site{i}.csv", index=False)
        names.append(f"site{i}.csv")
    test.to_csv(tmp / "test.csv", index=False)
    scen = {k: v for k, v in SCENARIO.items() if k not in ("data", "partition")}
    return {**scen, "data": {"tables": names, "label_column": "target", "test_table": "test.csv"}}


@pytest.mark.slow
def test_a_scenario_runs_on_both_nodes_of_an_existing_cluster_with_the_single_machine_result(tmp_path: Path, cluster) -> None:
    from rich.console import Console

    from fedseek.ops.simulate import simulate

    scen = tmp_path / "scenario.yaml"
    scen.write_text(yaml.safe_dump(_with_site_tables(tmp_path)))
    quiet = Console(file=open(tmp_path / "console.txt", "w"), width=120)  # noqa: SIM115 - closed with the test's tmp dir
    local = run_in_process(scen, tmp_path / "local", SCENARIO["num_sites"]).model_dump()
    on_cluster = simulate(scen, tmp_path / "cluster", console=quiet, ray_address=cluster.address)
    assert on_cluster["status"] == "completed" and on_cluster["rounds_completed"] == 3
    assert on_cluster["final_accuracy"] == pytest.approx(local["final_accuracy"])
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("local", "cluster"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    console = (tmp_path / "console.txt").read_text()
    assert f"Ray cluster {cluster.address}: 2 nodes, 2 CPUs" in console
    used = _actor_nodes(cluster.address)
    alive = {n.node_id for n in cluster.list_all_nodes()}
    assert used == alive and len(used) == 2, (used, alive)  # virtual sites ran on both nodes
    assert all(n.remaining_processes_alive() for n in cluster.list_all_nodes())  # fedseek left the cluster running
    assert json.loads((tmp_path / "cluster" / "summary.json").read_text())["seed"] == 3


@pytest.mark.slow
def test_a_node_without_what_a_site_imports_is_one_clear_error(cluster) -> None:
    from fedseek.ops.ray_cluster import ClusterError, check_cluster

    info = check_cluster(cluster.address)
    assert len(info.nodes) == 2 and info.cpus == 2 and all(n["versions"]["fedseek"] for n in info.nodes)
    with pytest.raises(ClusterError, match=r"node .* cannot import fedseek_not_installed \(ModuleNotFoundError.*install the project"):
        check_cluster(cluster.address, modules=("fedseek", "fedseek_not_installed"))


def test_on_a_cluster_the_engine_gets_its_address_and_no_cpu_count_and_a_local_run_stays_local(tmp_path: Path, monkeypatch) -> None:
    """Ray refuses num_cpus when it joins a cluster; a bare ray.init() joins RAY_ADDRESS or a `ray start` cluster of this
    machine, so a local run pins RAY_ADDRESS=local."""
    from fedseek.config import ConfigError, load_scenario
    from fedseek.ops import simulate as sim

    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump({**SCENARIO, "simulation": {"ray_address": "10.0.0.5:6379", "gpus_per_site": 0.5}}))
    cfg = load_scenario(scen)
    req = sim._request(cfg, scen, tmp_path / "out", 9999, state_dir=None, timeout_s=None, resume=False)
    assert req.federation_config == {"num-supernodes": 4, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.5}
    scen.write_text(yaml.safe_dump(SCENARIO))
    local = sim._request(load_scenario(scen), scen, tmp_path / "out", 9999, state_dir=None, timeout_s=None, resume=False)
    assert local.federation_config is not None and local.federation_config["init-args-num-cpus"] >= 1
    seen: dict[str, str] = {}
    monkeypatch.setattr(sim, "start_process", lambda cmd, env, log, name: seen.update(env))
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # the shell's cluster is not joined by a local run
    sim._start_superlink(tmp_path, 9999, None)
    assert seen["RAY_ADDRESS"] == "local"
    sim._start_superlink(tmp_path, 9999, None, "10.0.0.5:6379")
    assert seen["RAY_ADDRESS"] == "10.0.0.5:6379"
    scen.write_text(yaml.safe_dump({**SCENARIO, "simulation": {"ray_address": "auto", "ray_cpus": 4}}))
    with pytest.raises(ConfigError, match="ray_cpus sizes the Ray fedseek starts"):
        load_scenario(scen)
