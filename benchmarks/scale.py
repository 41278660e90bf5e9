"""Simulation scale: 100 and 1000 virtual sites on this machine (issue 8).

Each configuration is a real `fedseek simulate` run (fedseek.ops.simulate.simulate: private
SuperLink, `flwr run`, Ray) of a tiny task: synthetic bank transactions, one bank per site
(`bank_fraud`, natural partition, 20 rows per bank -> ~15 training rows per site), MLP [64],
1 local epoch, 3 rounds, sampling 10% or 100% of the sites per round. Measured:

* wall time of the whole run and the start-up before round 1 (SuperLink, Ray, node
  registration, the coordinator asking every node which site it is);
* per-round time from metrics.jsonl (`round_seconds`); "steady" = rounds 2.. (round 1 can
  include Ray actors still importing torch);
* per-call cost: steady round time / train calls per round, and the same times the number of
  Ray actors working in parallel (actor-seconds per call); the pure training part of a call is
  timed in-process (train_local on a site-sized partition), the rest is platform overhead
  (Flower/Ray messaging, fedseek site + coordinator work);
* peak memory of the whole process tree (SuperLink, SuperExec, flwr-simulation, Ray GCS,
  raylet, agents, actors): PSS (shared pages split fairly) and RSS summed over every
  descendant, sampled every 0.5 s by a thread reading /proc/PID/smaps_rollup and status.

Writes benchmarks/results/scale.json.
Run: .venv/bin/python benchmarks/scale.py [--quick]   (--quick: 100 sites only)
     .venv/bin/python benchmarks/scale.py --configs 10000:0.01,10000:0.1 --out benchmarks/results/scale_10k.json
     .venv/bin/python benchmarks/scale.py --ray-cluster 2 --configs 100:1.0,1000:0.1 --out benchmarks/results/scale_cluster.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
ROWS_PER_BANK = 20
ROUNDS = 3


# ---------------------------------------------------------------------------- memory of a process tree
def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) from /proc/PID/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[1]), int(rest[3]), int(rest[19])


def _kb(path: str, key: str) -> int | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class TreeMemory:
    """Samples the summed PSS and RSS of every descendant of `root` (not `root` itself) every `interval` s.

    A process belongs to the tree if its parent does, or if it sits in the session of a member
    (Flower's daemons are started in their own sessions; Ray children stay in them), so a
    grandchild is still counted after its parent exits. `root`'s own session is not used, so
    unrelated processes of the calling shell are not counted. The root process is sampled
    separately (`driver_*`).
    """

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        st = _stat(self.root)
        self.root_sid = st[1] if st else -1
        self.members: dict[int, int] = {}  # pid -> start time
        self.sids: set[int] = set()
        self.peak_pss_kb = self.peak_rss_kb = 0
        self.peak_procs = 0
        self.driver_peak_rss_kb = 0
        self.samples = 0
        self.sample_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a vanished process mid-read must not end sampling
                pass
            self.sample_seconds += time.perf_counter() - t
            self._stop.wait(self.interval)

    def sample(self) -> None:
        table: dict[int, tuple[int, int, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (st := _stat(int(name))) is not None:
                table[int(name)] = st
        frontier = {self.root} | {p for p, start in self.members.items() if table.get(p, (0, 0, -1))[2] == start}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, sid, start) in table.items():
                if pid == self.root or self.members.get(pid) == start:
                    continue
                if ppid in frontier or (sid in self.sids and sid != self.root_sid):
                    self.members[pid] = start
                    frontier.add(pid)
                    if sid != self.root_sid:
                        self.sids.add(sid)
                    changed = True
        pss = rss = procs = 0
        for pid, start in list(self.members.items()):
            if table.get(pid, (0, 0, -1))[2] != start:
                continue
            p = _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
            r = _kb(f"/proc/{pid}/status", "VmRSS:")
            if r is None:
                continue
            pss += p or 0
            rss += r
            procs += 1
        self.samples += 1
        if pss > self.peak_pss_kb:
            self.peak_pss_kb = pss
        if rss > self.peak_rss_kb:
            self.peak_rss_kb = rss
        self.peak_procs = max(self.peak_procs, procs)
        self.driver_peak_rss_kb = max(self.driver_peak_rss_kb, _kb(f"/proc/{self.root}/status", "VmRSS:") or 0)

    def result(self) -> dict[str, Any]:
        return {
            "peak_pss_mb": round(self.peak_pss_kb / 1024, 1),
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "peak_processes": self.peak_procs,
            "driver_peak_rss_mb": round(self.driver_peak_rss_kb / 1024, 1),
            "samples": self.samples,
            "sampler_cpu_share": round(self.sample_seconds / max(1e-9, self.samples * self.interval + self.sample_seconds), 3),
        }


# ---------------------------------------------------------------------------- helpers
def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict[str, Any]:
    import flwr
    import torch

    mem_total = _kb("/proc/meminfo", "MemTotal:") or 0
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores_usable": cores(),
        "memory_gb": round(mem_total / 1024 / 1024, 1),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def train_seconds_per_call(rows: int, epochs: int, batch: int, hidden: list[int], repeats: int = 200) -> float:
    """Median wall time of fedseek's train_local on one site-sized partition (the useful work of a call)."""
    import numpy as np
    import torch

    from fedseek.train.local import train_local
    from fedseek.train.models import build_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 17)).astype(np.float32)
    y = (rng.random(rows) < 0.2).astype(np.int64)
    times = []
    for r in range(repeats + 5):
        model = build_model("mlp", (17,), 2, hidden, seed=r)
        t = time.perf_counter()
        train_local(model, x, y, num_classes=2, epochs=epochs, lr=0.05, batch_size=batch, seed=r)
        if r >= 5:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def scenario_yaml(num_sites: int, fraction: float, rounds: int = ROUNDS) -> str:
    return f"""# written by benchmarks/scale.py
name: scale-{num_sites}-f{fraction:g}
seed: 11
num_sites: {num_sites}
rounds: {rounds}
data:
  dataset: bank_fraud
  options: {{num_banks: {num_sites}, rows_per_bank: {ROWS_PER_BANK}}}
partition: {{scheme: natural, min_partition_size: 1}}
model: {{kind: mlp, hidden: [64]}}
strategy: {{name: fedavg, min_sites: {num_sites}, fraction_train: {fraction}}}
train: {{local_epochs: 1, lr: 0.05, batch_size: 16}}
round_timeout_s: 600
simulation: {{cpus_per_site: 1, node_wait_s: 600}}
"""


def run_one(num_sites: int, fraction: float, work: Path, train_s: float, ray_address: str | None = None) -> dict[str, Any]:
    from rich.console import Console

    from fedseek.ops.simulate import simulate
    from fedseek.outputs.store import read_metrics

    work.mkdir(parents=True, exist_ok=True)
    scenario = work / "scenario.yaml"
    scenario.write_text(scenario_yaml(num_sites, fraction))
    out = work / "out"
    console = Console(file=io.StringIO(), width=120)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    error = None
    with TreeMemory(interval=0.5) as mem:
        try:
            summary = simulate(scenario, out, console=console, timeout_s=3000, ray_address=ray_address)
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            summary, error = None, f"{type(exc).__name__}: {str(exc)[-1500:]}"
    wall = time.time() - t0
    rows = read_metrics(out / "metrics.jsonl")
    rs = [float(r["round_seconds"]) for r in rows]
    steady = rs[1:] if len(rs) > 1 else rs
    sampled = [int(r["sampled"]) for r in rows]
    calls = statistics.mean(sampled[1:] if len(sampled) > 1 else sampled) if sampled else 0
    actors = max(1, cores() // 1)  # simulation.ray_cpus defaults to all cores, 1 CPU per site
    steady_s = statistics.mean(steady) if steady else None
    per_call = steady_s / calls if steady_s and calls else None
    actor_s = per_call * actors if per_call else None
    first_start = (rows[0]["time"] - rows[0]["round_seconds"] - t0) if rows else None
    res: dict[str, Any] = {
        "num_sites": num_sites,
        "fraction_train": fraction,
        "mode": "this machine (a Ray fedseek starts)" if ray_address is None else f"existing Ray cluster {ray_address}",
        "rounds": ROUNDS,
        "rounds_completed": len(rows),
        "train_calls_per_round": calls,
        "ray_actors": actors,
        "ok": error is None,
        "error": error,
        "wall_s": round(wall, 2),
        "startup_s": round(first_start, 2) if first_start is not None else None,
        "round_seconds": [round(x, 3) for x in rs],
        "steady_round_s": round(steady_s, 3) if steady_s is not None else None,
        "seconds_per_call": round(per_call, 5) if per_call else None,
        "actor_seconds_per_call": round(actor_s, 5) if actor_s else None,
        "train_seconds_per_call": round(train_s, 5),
        "overhead_seconds_per_call": round(actor_s - train_s, 5) if actor_s else None,
        "final_accuracy": (summary or {}).get("final_accuracy"),
        "final_auc": ((summary or {}).get("final") or {}).get("auc"),
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        **mem.result(),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 sites only")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep run directories here (default: a temp dir, removed)")
    ap.add_argument("--configs", default=None, help="SITES:FRACTION,... instead of the default set (e.g. 10000:0.01,10000:0.1)")
    ap.add_argument("--ray-cluster", type=int, default=0, metavar="NODES",
                    help="run on a Ray cluster of NODES nodes x 1 CPU started here on loopback (Ray's multi-node test harness)")
    args = ap.parse_args()
    configs = [(100, 0.1), (100, 1.0)] + ([] if args.quick else [(1000, 0.1), (1000, 1.0)])
    if args.configs:
        configs = [(int(n), float(f)) for n, f in (c.split(":") for c in args.configs.split(","))]
    train_s = train_seconds_per_call(int(ROWS_PER_BANK * 0.75), 1, 16, [64])
    print(f"train_local on a ~{int(ROWS_PER_BANK * 0.75)}-row site: {train_s * 1000:.2f} ms per call", flush=True)
    runs = []
    cluster = None
    if args.ray_cluster:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process (ours and the simulation's) on 127.0.0.1
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(args.ray_cluster - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(f"Ray cluster {cluster.address}: {args.ray_cluster} nodes x 1 CPU", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedseek-scale-") as tmp:
        base = args.keep or Path(tmp)
        for n, f in configs:
            print(f"== {n} sites, fraction_train {f:g}", flush=True)
            r = run_one(n, f, base / f"n{n}-f{f:g}", train_s, cluster.address if cluster else None)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("ok", "wall_s", "startup_s", "round_seconds", "steady_round_s", "seconds_per_call",
                                                "actor_seconds_per_call", "overhead_seconds_per_call", "peak_pss_mb", "peak_rss_mb",
                                                "peak_processes", "error")}), flush=True)
    fits = []
    for n in sorted({r["num_sites"] for r in runs}):
        pair = sorted((r for r in runs if r["num_sites"] == n and r["ok"] and r["steady_round_s"]), key=lambda r: r["train_calls_per_round"])
        if len(pair) >= 2 and pair[-1]["train_calls_per_round"] > pair[0]["train_calls_per_round"]:
            lo, hi = pair[0], pair[-1]
            marginal = (hi["steady_round_s"] - lo["steady_round_s"]) / (hi["train_calls_per_round"] - lo["train_calls_per_round"])
            actors = hi["ray_actors"]
            fits.append({
                "num_sites": n,
                "calls": [lo["train_calls_per_round"], hi["train_calls_per_round"]],
                "marginal_seconds_per_call": round(marginal, 5),
                "marginal_actor_seconds_per_call": round(marginal * actors, 5),
                "marginal_overhead_seconds_per_call": round(marginal * actors - train_s, 5),
                "fixed_seconds_per_round": round(lo["steady_round_s"] - marginal * lo["train_calls_per_round"], 3),
            })
    result = {
        "benchmark": "simulation scale (issue 8): N virtual sites through fedseek simulate (Flower simulation engine, Ray)",
        "task": f"bank_fraud, one bank per site, {ROWS_PER_BANK} rows per bank (~{int(ROWS_PER_BANK * 0.75)} train rows per site), "
                f"MLP [64], 1 local epoch, batch 16, {ROUNDS} rounds, no DP",
        "quick": args.quick,
        "machine": machine(),
        "method": {
            "round_seconds": "from metrics.jsonl; steady = mean of rounds 2..",
            "startup_s": "from the call to simulate() to the start of round 1 (SuperLink + flwr run + Ray + node registration + site discovery)",
            "seconds_per_call": "steady round time / train calls per round",
            "actor_seconds_per_call": "seconds_per_call x Ray actors working in parallel (cores / cpus_per_site)",
            "overhead_seconds_per_call": "actor_seconds_per_call - train_seconds_per_call (in-process train_local, median)",
            "memory": "sum over every descendant process of PSS (smaps_rollup) and RSS, sampled every 0.5 s; driver = this benchmark process",
            "fits": "steady round time = fixed + marginal x calls, from the 10% and 100% runs of the same N (fixed: coordinator evaluation, checkpoint, metrics; marginal: one more site trained)",
            "noise": "2 shared cores: other sessions' work shows up in the timings; loadavg recorded per run",
        },
        "runs": runs,
        "fits": fits,
    }
    if cluster is not None:
        result["ray_cluster"] = {"nodes": args.ray_cluster, "cpus_per_node": 1, "address": cluster.address,
                                 "how": "ray.cluster_utils.Cluster on loopback: a head and NODES-1 more raylets on this machine"}
        cluster.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
