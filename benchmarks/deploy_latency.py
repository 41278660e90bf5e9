"""Deployed round latency of the demo model over loopback: where a round's seconds go, and what fedseek removed.

A real deployment on 127.0.0.1 (CA, site certificates and keys, `fedseek coordinator start`, two
`fedseek site start` daemons on built-in breast-cancer partitions, `fedseek run`), once per variant:

* `flower-defaults`: sites reach the SuperLink straight over HTTPS, Flower's own timings
  (SuperNode idle poll 3 s, ServerApp pull 3 s, a fresh `flwr-clientapp` interpreter per message);
* `grpc-flower-timings`: the gRPC mutual-TLS tunnel with Flower's timings (what the tunnel costs);
* `https-fast`: direct HTTPS with fedseek's timings (0.5 s idle poll, 0.2 s pull, warm forked ClientApps);
* `grpc-fast`: fedseek's default (tunnel + fedseek's timings).

Per variant: each round's `round_seconds` (metrics.jsonl); steady = median of rounds 2..R; with warm
ClientApps, the median seconds one forked ClientApp task runs (fork to exit, from the sites' logs:
FAB install, app load, DP training, reply push). The breakdown adds the separately measured parts: the import a fresh ClientApp pays (torch, Opacus,
fedseek; median of 3 fresh interpreters), and the tunnel's per-call overhead (median over 200
calls at 40 KB, loopback: site proxy and endpoint as their own processes -> an HTTPS stand-in for the
SuperLink, vs the same client to the stand-in directly).

Writes benchmarks/results/deploy_latency.json. `FEDSEEK_KEEP=DIR` keeps each deployment's files (logs) in DIR;
with `FEDSEEK_TRANSPORT_TRACE=1` the site proxies and the endpoint log every call's milliseconds.
Run: .venv/bin/python benchmarks/deploy_latency.py [--rounds 4] [--variants grpc-fast,flower-defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from fedseek.ops import pki  # noqa: E402
from fedseek.ops.processes import free_port  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "flower-defaults": {"transport": "https", "poll": 3.0, "warm": False, "pull": 3.0},
    "grpc-flower-timings": {"transport": "grpc", "poll": 3.0, "warm": False, "pull": 3.0},
    "https-fast": {"transport": "https", "poll": 0.5, "warm": True, "pull": 0.2},
    "grpc-fast": {"transport": "grpc", "poll": 0.5, "warm": True, "pull": 0.2},
}
SITES = ("hospital-a", "hospital-b")


def fedseek(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_variant(name: str, v: dict[str, Any], rounds: int, root: Path) -> dict[str, Any]:
    """One deployment (coordinator + 2 sites) and one `fedseek run`; every process stopped afterwards."""
    certs = root / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    ep_port, sl_port = free_port(), free_port()
    for s in SITES:
        pki.add_site(certs, s, f"127.0.0.1:{ep_port}")
    site_port = ep_port if v["transport"] == "grpc" else sl_port
    coord = _write(root / "coordinator.yaml", {
        "name": f"latency-{name}", "seed": 42, "rounds": rounds, "transport": "grpc" if v["transport"] == "grpc" else "https",
        "task": {"dataset": "breast_cancer"}, "model": {"kind": "mlp", "hidden": [64]},
        "strategy": {"name": "fedavg", "min_sites": 2}, "train": {"local_epochs": 1, "lr": 0.1, "batch_size": 16},
        "round_timeout_s": 120,
        **({"endpoint": {"host": "127.0.0.1", "port": ep_port}} if v["transport"] == "grpc" else {}),
        "superlink": {"host": "127.0.0.1", "port": sl_port, "certs_dir": str(certs), "state_dir": str(root / "coord")},
        "sites": [{"name": s, "public_key": str(certs / "sites" / s / f"{s}.pub")} for s in SITES],
        "expected_sites": 2, "node_wait_s": 120, "out_dir": str(root / "out"),
    })
    site_cfgs = []
    for i, s in enumerate(SITES):
        b = certs / "sites" / s
        site_cfgs.append(_write(root / f"{s}.yaml", {
            "name": s, "coordinator": f"127.0.0.1:{site_port}", "transport": v["transport"],
            "root_certificates": str(b / "ca.crt"), "auth_private_key": str(b / s),
            **({"tls_certificate": str(b / f"{s}.crt"), "tls_private_key": str(b / f"{s}.tls.key"), "proxy_port": free_port()}
               if v["transport"] == "grpc" else {}),
            "data": {"builtin": "breast_cancer", "partition": i, "num_partitions": 2, "seed": 42},
            "privacy": {"epsilon_budget": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "grad_sample_mode": "ghost"},
            "state_dir": str(root / "sites" / s), "device": "cpu", "runtime_port": free_port(),
            "poll_interval_s": v["poll"], "warm_clientapp": v["warm"],
        }))
    env = {**os.environ, "FEDSEEK_PULL_INTERVAL_S": str(v["pull"])}
    try:
        res = fedseek("coordinator", "start", "--config", str(coord), env=env)
        if res.returncode != 0:
            raise RuntimeError(f"coordinator start: {res.stderr[-2000:]}")
        for cfg in site_cfgs:
            res = fedseek("site", "start", "--config", str(cfg), "--wait", "90")
            if res.returncode != 0:
                raise RuntimeError(f"site start: {res.stderr[-2000:]}")
        t0 = time.monotonic()
        res = fedseek("run", "--config", str(coord), "--out", str(root / "out"), env=env)
        wall = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"run: {res.stderr[-3000:]}")
    finally:
        for cfg in site_cfgs:
            fedseek("site", "stop", "--config", str(cfg))
        fedseek("coordinator", "stop", "--config", str(coord))
        if os.environ.get("FEDSEEK_KEEP"):
            import shutil

            shutil.copytree(root, os.environ["FEDSEEK_KEEP"], dirs_exist_ok=True)
    rows = [json.loads(ln) for ln in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    import re

    task_s = [float(m) for s in SITES for m in re.findall(r"ClientApp task \d+ ran ([0-9.]+)s",
                                                           (root / "sites" / s / "supernode.log").read_text())]
    secs = [round(r["round_seconds"], 2) for r in rows]
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"variant": name, **v, "round_seconds": secs, "steady_round_s": round(statistics.median(secs[1:] or secs), 2),
            "clientapp_task_s_median": round(statistics.median(task_s), 2) if task_s else None,
            "clientapp_tasks": len(task_s), "run_wall_s": round(wall, 1), "final_accuracy": summary.get("final_accuracy"), "status": summary.get("status")}


def import_cost(n: int = 3) -> float:
    """Seconds a fresh ClientApp interpreter spends importing what fedseek's ClientApp needs (median of n)."""
    code = "import flwr.supernode.runtime.run_clientapp, torch, opacus, sklearn, fedseek.runtime.site, fedseek.runtime.site_eval"
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.monotonic() - t0)
    return round(statistics.median(times), 2)


def tunnel_overhead(calls: int = 200, size: int = 40 * 1024) -> dict[str, float]:
    """Median ms per Fleet call at `size` bytes: through the site proxy and endpoint (each its own process, as deployed)
    to an HTTPS stand-in for the SuperLink, vs the same client straight to the stand-in."""
    import ssl

    import httpx

    from fedseek.ops.processes import wait_for_port
    from fedseek.ops.transport.access import write_sites
    from fedseek.wire.identity import read_site_keys
    from tests.transport_rig import Recorder, make_site, start_upstream

    root = Path(tempfile.mkdtemp(prefix="fedseek-tunnel-"))
    certs = root / "certs"
    pki.init_ca(certs, hosts=[], ips=[])
    site = make_site(root, certs, "site-a")
    write_sites(root / "sites.json", read_site_keys([("site-a", site.node_pub)]))
    upstream, up_port = start_upstream(certs, Recorder())
    ep_port, proxy_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "fedseek.ops.transport.endpoint", "--listen", f"127.0.0.1:{ep_port}",
                               "--upstream", f"127.0.0.1:{up_port}", "--certfile", str(certs / pki.COORDINATOR_CRT),
                               "--keyfile", str(certs / pki.COORDINATOR_KEY), "--cafile", str(certs / pki.CA_CRT),
                               "--sites", str(root / "sites.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "fedseek.ops.transport.site_proxy", "--port", str(proxy_port),
                               "--coordinator", f"127.0.0.1:{ep_port}", "--cafile", str(certs / pki.CA_CRT),
                               "--certfile", str(site.cert), "--keyfile", str(site.tls_key), "--loopback-dir", str(root / "lb")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for_port("127.0.0.1", ep_port, 60, procs[0])
        wait_for_port("127.0.0.1", proxy_port, 60, procs[1])
        body = os.urandom(size)
        headers = {"content-type": "application/protobuf", "flwr-public-key": site.node_key_header()}

        def timed(client: httpx.Client, url: str) -> float:
            for _ in range(20):
                client.post(url, content=body, headers=headers)
            out = []
            for _ in range(calls):
                t0 = time.perf_counter()
                r = client.post(url, content=body, headers=headers)
                out.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200
            return statistics.median(out)

        with httpx.Client(verify=ssl.create_default_context(cafile=str(root / "lb" / "loopback-ca.crt"))) as c:
            tunnel = timed(c, f"https://127.0.0.1:{proxy_port}/v1/fleet/push-object")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certs / pki.CA_CRT))) as c:
            direct = timed(c, f"https://127.0.0.1:{up_port}/v1/fleet/push-object")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)
        upstream.stop()
    return {"tunnel_ms": round(tunnel, 2), "direct_https_ms": round(direct, 2), "overhead_ms": round(tunnel - direct, 2),
            "bytes": size, "calls": calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(RESULTS / "deploy_latency.json"))
    a = p.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                               "rounds": a.rounds, "variants": []}
    results["tunnel_per_call"] = tunnel_overhead()
    print("tunnel per call:", results["tunnel_per_call"], flush=True)
    results["fresh_clientapp_import_s"] = import_cost()
    print("fresh ClientApp import:", results["fresh_clientapp_import_s"], "s", flush=True)
    for name in [v for v in a.variants.split(",") if v]:
        with tempfile.TemporaryDirectory(prefix=f"fedseek-latency-{name}-") as d:
            r = run_variant(name, VARIANTS[name], a.rounds, Path(d))
        print(json.dumps(r), flush=True)
        results["variants"].append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
