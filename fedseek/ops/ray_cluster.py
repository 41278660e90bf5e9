"""An existing Ray cluster for the simulation (`--ray-address`): checked before anything starts, never started or stopped by fedseek.

Flower's simulation engine calls ray.init() without an address, which connects to the cluster
named by RAY_ADDRESS; fedseek sets it in the SuperLink's environment (and removes an inherited
one when no cluster is asked for, so a local run stays local). Before the run, a probe process
connects once and runs one small task pinned to every alive node that imports what a virtual site
needs (fedseek, torch, opacus, flwr): a node without them is one clear error instead of failing
actors in the middle of a run.

Usage of the probe (what `check_cluster` runs): python -m fedseek.ops.ray_cluster ADDRESS [MODULE...]
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

SITE_MODULES = ("fedseek", "torch", "opacus", "flwr")
PROBE_TIMEOUT_S = 120.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot run fedseek's virtual sites (one line)."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the probe found: alive nodes (id, address, CPUs, GPUs) and the fedseek version on them."""

    address: str
    nodes: list[dict[str, Any]]

    @property
    def cpus(self) -> float:
        """CPUs of all alive nodes together."""
        return sum((float(n.get("cpus") or 0) for n in self.nodes), 0.0)

    @property
    def gpus(self) -> float:
        """GPUs of all alive nodes together."""
        return sum((float(n.get("gpus") or 0) for n in self.nodes), 0.0)


def check_cluster(address: str, modules: tuple[str, ...] = SITE_MODULES, timeout_s: float = PROBE_TIMEOUT_S) -> ClusterInfo:
    """Connect to the cluster at `address` in a probe process; ClusterError unless every alive node imports `modules`."""
    cmd = [sys.executable, "-m", "fedseek.ops.ray_cluster", address, *modules]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"Ray cluster {address}: no answer within {timeout_s:.0f}s (is `ray start --head` running there, "
                           "and is the address HOST:PORT of its GCS?)") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise ClusterError(f"Ray cluster {address}: cannot connect ({tail})")
    report = json.loads(lines[-1])
    if report.get("error"):
        raise ClusterError(f"Ray cluster {address}: {report['error']}")
    return ClusterInfo(address, list(report["nodes"]))


def _probe(address: str, modules: list[str]) -> dict[str, Any]:
    """Runs inside the probe process: every alive node imports `modules`, or the first that cannot is named."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if not alive:
            return {"error": "no alive node"}

        @ray.remote(num_cpus=0)
        def imports(names: list[str]) -> dict[str, str]:
            import importlib

            found = {}
            for name in names:
                try:
                    mod = importlib.import_module(name)
                except Exception as exc:  # noqa: BLE001 - the node's answer, reported as it is
                    found[name] = f"ERROR {type(exc).__name__}: {exc}"
                else:
                    found[name] = str(getattr(mod, "__version__", "?"))
            return found

        refs = {n["NodeID"]: imports.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(modules)
                for n in alive}
        nodes = []
        for n in alive:
            found = ray.get(refs[n["NodeID"]], timeout=PROBE_TIMEOUT_S / 2)
            bad = {k: v for k, v in found.items() if v.startswith("ERROR")}
            where = f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]})"
            if bad:
                name, why = next(iter(bad.items()))
                return {"error": f"{where} cannot import {name} ({why.removeprefix('ERROR ')[:160]}): install the project's "
                                 "environment on every node (docs/simulation.md, 'On a Ray cluster')"}
            res = n.get("Resources", {})
            nodes.append({"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "cpus": res.get("CPU", 0),
                          "gpus": res.get("GPU", 0), "versions": found})
        return {"nodes": nodes}
    finally:
        ray.shutdown()  # disconnects this driver; the cluster keeps running


def main(argv: list[str] | None = None) -> int:
    """Probe entry point: prints one JSON line (nodes, or an error)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m fedseek.ops.ray_cluster ADDRESS [MODULE...]", file=sys.stderr)
        return 2
    try:
        report = _probe(args[0], list(args[1:]) or list(SITE_MODULES))
    except Exception as exc:  # noqa: BLE001 - a connection failure is the answer
        report = {"error": f"cannot connect ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
