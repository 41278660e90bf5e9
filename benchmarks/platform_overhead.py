"""Platform overhead: `fedseek simulate` vs a minimal plain-Flower app doing the same training, launch to exit.

Goals (issue 13), on the default scenario (median of >= 5 alternating runs): time from launch to
the end of round 1 within 2 s of the plain app, total wall <= 1.05x, steady round <= 1.10x.

The plain app (benchmarks/_plain_app.py) is written into a temp dir: a Flower App (pyproject [tool.flwr.app]) whose
ClientApp trains the same fedseek MLP with the same training loop (fedseek.train.local.train_local)
on the same partition of the same built-in dataset (fedseek.data: same seed, scheme, alpha) for
the same epochs / lr / batch, and whose ServerApp runs flwr.serverapp.strategy.FedAvg.start
with the same central evaluation each round (fedseek.train.local.evaluate on the same test
split) and no federated evaluation, exactly like fedseek's coordinator. What fedseek adds is
therefore its platform layer: site discovery, seeded sampling, delta encoding + screening of
every reply, per-site views, metrics.jsonl (fsync'd), an atomic checkpoint per round, the audit
log, report.html (and, when configured: DP ledgers, compression, sparsity, watermark, Prometheus).

Each app is launched the way its users launch it:
* plain Flower: `flower-superlink --simulation` on a free loopback port, `flwr run APP CONN
  --format json` (the flwr CLI builds the FAB and submits), the run status polled through the
  Control API every 0.2 s, then every process stopped (by pid, psutil);
* fedseek: `python -m fedseek simulate SCENARIO --out OUT` as a subprocess, until it exits
  (it starts and stops its own SuperLink, follows the run, prints its table, writes report.html).
Runs alternate (plain, fedseek, fedseek, plain, ...) so drifting load on the shared cores hits both.

Per-round period = time between consecutive round-end stamps (fedseek: metrics.jsonl "time";
plain: the central-evaluation callback), so both include everything a round costs; round 1
(Ray actors importing torch) is excluded from the steady state. launch_to_round1_s = launch to
the end of round 1; wall_s = launch until the operator has the prompt back, every process stopped.

Writes benchmarks/results/platform_overhead.json. `--fedseek-root DIR` runs the fedseek of another
checkout (e.g. an older one) against the same plain app, to compare before/after.
Run: .venv/bin/python benchmarks/platform_overhead.py [--quick] [--repeats N] [--rounds N] [--workloads a,b]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _plain_app import write_plain_app  # noqa: E402
from scale import TreeMemory, cores, machine  # noqa: E402

from fedseek.ops.flower_control import ControlClient, flower_env, flwr_bin, write_connection  # noqa: E402
from fedseek.ops.processes import free_port, start_process, wait_for_port  # noqa: E402
from fedseek.outputs.schema import read_rows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GOALS = {"steady_round_ratio": 1.10, "wall_ratio": 1.05, "launch_to_round1_extra_s": 2.0}
CONNECTION = "bench"

# The shared workload (fedseek's default `make demo` scenario, minus its Prometheus endpoint).
WORKLOADS: dict[str, dict[str, Any]] = {
    # simulations/hospitals.yaml: 10 sites, ~40 rows each -> rounds of ~0.1 s, Flower's 0.1 s polling dominates
    "hospitals": {"dataset": "breast_cancer", "options": {}, "num_sites": 10, "scheme": "dirichlet", "alpha": 1.0, "kind": "mlp",
                  "hidden": [64], "epochs": 2, "lr": 0.05, "batch": 16, "momentum": 0.0, "test_fraction": 0.25, "seed": 42, "rounds": 20},
    # 100 banks of 150 training rows: many calls per round
    "banks100": {"dataset": "bank_fraud", "options": {"num_banks": 100, "rows_per_bank": 200}, "num_sites": 100, "scheme": "natural",
                 "alpha": 1.0, "kind": "mlp", "hidden": [64], "epochs": 1, "lr": 0.05, "batch": 32, "momentum": 0.0, "test_fraction": 0.25,
                 "seed": 3, "rounds": 10},
    # simulations/digits.yaml: 20 sites, CNN, Dirichlet 0.5 -> compute-bound rounds of seconds
    "digits": {"dataset": "digits", "options": {}, "num_sites": 20, "scheme": "dirichlet", "alpha": 0.5, "kind": "cnn", "hidden": [64],
               "epochs": 2, "lr": 0.05, "batch": 16, "momentum": 0.9, "test_fraction": 0.25, "seed": 7, "rounds": 8},
}

METHOD = {
    "plain": "flower-superlink --simulation, `flwr run APP CONN --format json` (the flwr CLI), Control API polled every 0.2 s, "
             "every process stopped by pid (SIGTERM, psutil)",
    "fedseek": "`python -m fedseek simulate SCENARIO --out OUT` as a subprocess, launch to exit",
    "same_work": "same dataset split and partitions, same model, same train_local loop / epochs / lr / batch / momentum, same central "
                 "evaluation each round, no federated evaluation (identical final accuracy in every pair confirms it)",
    "period": "seconds between consecutive round ends; round 1 excluded (Ray actor start)",
    "steady_round_s": "median over rounds 2.. per run, then median over repeats; the steady-round goal is judged on this ratio",
    "launch_to_round1_s": "launch to the end of round 1 (both apps: SuperLink start, submit, Ray and its actors, round 1)",
    "startup_s": "launch to the start of round 1; fedseek's includes Ray actor start (its site-discovery query is the first call), "
                 "plain's does not (its initial central evaluation runs before any actor starts): compare launch_to_round1_s",
    "wall_s": "launch until every process is stopped and the command returned; fedseek's includes writing report.html",
    "cpu_s": "CPU seconds (user + system) of every process the run started (the benchmark is their subreaper): the work done, "
             "a figure the load of other jobs on shared cores moves far less than wall times",
    "order": "plain and fedseek alternate (ABBA), repeats times",
    "quantization": "Flower's simulation engine feeds messages to the actors every 0.1 s and the grid pulls replies on a similar "
                    "interval, so round times come in ~0.1 s steps: for rounds of ~0.1 s (hospitals) a few ms of extra work can push "
                    "a round into the next step",
    "not_in_plain": "site discovery query, seeded sampling by site name, delta encoding + validation of each reply, per-site views, "
                    "metrics.jsonl, checkpoint, audit log, report.html",
}


def scenario_yaml(name: str, w: dict[str, Any], rounds: int) -> str:
    """The workload as a fedseek scenario."""
    opts = json.dumps(w["options"])
    return textwrap.dedent(f"""\
        # written by benchmarks/platform_overhead.py
        name: overhead-{name}
        seed: {w['seed']}
        num_sites: {w['num_sites']}
        rounds: {rounds}
        data: {{dataset: {w['dataset']}, test_fraction: {w['test_fraction']}, options: {opts}}}
        partition: {{scheme: {w['scheme']}, alpha: {w['alpha']}, min_partition_size: 2}}
        model: {{kind: {w['kind']}, hidden: {json.dumps(w['hidden'])}}}
        strategy: {{name: fedavg, min_sites: {w['num_sites']}}}
        train: {{local_epochs: {w['epochs']}, lr: {w['lr']}, batch_size: {w['batch']}, momentum: {w['momentum']}}}
        round_timeout_s: 600
        simulation: {{cpus_per_site: 1}}
        """)


class ChildCPU:
    """CPU seconds (user + system) of every process a run started (diagnostic: the work done, whatever the wall time).

    The benchmark is their subreaper (become_subreaper), so processes orphaned during the run are
    re-parented to it; on exit every one is waited for (so its time is counted here, not in the
    next run), and any still running after `wait_s` is killed and counted in `leftovers`.
    """

    cpu_s = 0.0
    leftovers = 0

    def __init__(self, wait_s: float = 30.0) -> None:
        self.wait_s = wait_s

    def __enter__(self) -> ChildCPU:
        self._before = self._used()
        return self

    def __exit__(self, *exc: Any) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                break
            if pid == 0 and time.monotonic() > deadline:
                self._kill_adopted()
            elif pid == 0:
                time.sleep(0.05)
        self.cpu_s = round(self._used() - self._before, 1)

    def _kill_adopted(self) -> None:
        import psutil

        for child in psutil.Process().children():
            self.leftovers += 1
            child.kill()

    @staticmethod
    def _used() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime


def become_subreaper() -> None:
    """Orphans of the runs' processes are re-parented to this process instead of init (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _flwr_run(app_dir: Path, run_config: dict[str, Any], fed: dict[str, Any], env: dict[str, str]) -> int:
    """`flwr run APP CONN --format json` as a plain Flower user runs it; the run id."""
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    cmd = [flwr_bin("flwr"), "run", str(app_dir), CONNECTION, "--format", "json",
           "--run-config", " ".join(f"{k}={value(v)}" for k, v in run_config.items()),
           "--federation-config", " ".join(f"{k}={v}" for k, v in fed.items())]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    payload = json.loads(res.stdout[res.stdout.find("{"):]) if "{" in res.stdout else {}
    if not payload.get("success"):
        raise RuntimeError(f"flwr run failed: {payload.get('error-message') or res.stderr[-800:]}")
    return int(payload["run-id"])


def run_plain_app(app_dir: Path, run_config: dict[str, Any], num_sites: int, work: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """Launch the plain app on a private simulation SuperLink and follow it to its end; times and memory."""
    work.mkdir(parents=True, exist_ok=True)
    flwr_home = work / ".flwr"
    env = flower_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
    fed = {"num-supernodes": num_sites, "client-resources-num-cpus": 1, "init-args-num-cpus": cores()}
    superlink, client, status, error, finished = None, None, None, None, None
    t0 = time.time()
    with open(work / "flower.log", "ab") as log, TreeMemory(interval=0.5) as mem, ChildCPU() as cpu:
        try:
            superlink = start_process(
                [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
                 "--port", str(port), "--database", str(flwr_home / "state.db"), "--disable-runtime-dependency-installation"],
                env=env, log=log, name="superlink")
            wait_for_port("127.0.0.1", port, 60, superlink.proc)
            run_id = _flwr_run(app_dir, run_config, fed, env)
            client = ControlClient(flwr_home, CONNECTION, quiet=True)
            deadline = time.monotonic() + timeout_s
            while True:  # nothing else: a plain Flower user just waits (the tree is sampled when it is stopped)
                status = client.status(run_id)
                if status.finished or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            finished = time.time()
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                client.close()
            if superlink is not None:
                superlink.stop()
        end = time.time()  # before ChildCPU waits for stragglers
    ok = error is None and status is not None and status.ok
    return {"ok": ok, "status": str(status) if status else None, "error": error, "t0": t0, "wall_s": end - t0,
            "finished_s": (finished - t0) if finished else None, "cpu_s": cpu.cpu_s, "leftover_processes": cpu.leftovers,
            **mem.result()}


def run_fedseek_cli(scenario: Path, out: Path, work: Path, root: Path = ROOT, timeout_s: float = 1800) -> dict[str, Any]:
    """`python -m fedseek.ops.cli simulate SCENARIO --out OUT` (the fedseek of checkout `root`) from launch to exit; times, memory."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if root != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    error = None
    t0 = time.time()
    with open(work / "fedseek.log", "wb") as log, TreeMemory(interval=0.5) as mem, ChildCPU() as cpu:
        proc = subprocess.Popen([sys.executable, "-m", "fedseek.ops.cli", "simulate", str(scenario), "--out", str(out)], cwd=root,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait(timeout=60)
            error = "timed out"
        end = time.time()  # before ChildCPU waits for stragglers
    if rc != 0 and error is None:
        error = f"exit {rc}: {(work / 'fedseek.log').read_text(errors='replace')[-600:]}"
    return {"ok": rc == 0, "status": f"exit {rc}", "error": error, "t0": t0, "wall_s": end - t0, "cpu_s": cpu.cpu_s,
            "leftover_processes": cpu.leftovers, **mem.result()}


def _periods(stamps: list[tuple[int, float]]) -> dict[int, float]:
    """Round -> seconds since the previous round's end (round 0 = initial evaluation)."""
    stamps = sorted(stamps)
    return {r: t - tp for (rp, tp), (r, t) in itertools.pairwise(stamps) if r == rp + 1}


def run_plain(app_dir: Path, w: dict[str, Any], rounds: int, work: Path) -> dict[str, Any]:
    """One plain-Flower run of the workload."""
    # "k:v,k:v": Flower's --run-config parser rejects quotes (and spaces) inside a string value
    rc = {"num-server-rounds": rounds, "num-sites": w["num_sites"], "dataset": w["dataset"],
          "data-options": ",".join(f"{k}:{v}" for k, v in w["options"].items()),
          "test-fraction": w["test_fraction"], "scheme": w["scheme"], "alpha": w["alpha"], "seed": w["seed"], "kind": w["kind"],
          "hidden": json.dumps(w["hidden"], separators=(",", ":")), "momentum": float(w["momentum"]), "local-epochs": w["epochs"],
          "lr": float(w["lr"]), "batch-size": w["batch"], "out-dir": str(work)}
    res = run_plain_app(app_dir, rc, w["num_sites"], work)
    path = work / "plain_rounds.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    per = _periods([(int(r["round"]), float(r["time"])) for r in rows])
    first = next((r for r in rows if r["round"] == 1), None)
    res.update({"app": "plain-flower", "period_s": [round(per[r], 4) for r in sorted(per)],
                "startup_s": round(rows[0]["time"] - res["t0"], 2) if rows else None,
                "launch_to_round1_s": round(first["time"] - res["t0"], 2) if first else None,
                "final_accuracy": rows[-1]["accuracy"] if rows else None, "rounds_completed": max(per) if per else 0})
    return res


def run_fedseek(name: str, w: dict[str, Any], rounds: int, work: Path, root: Path = ROOT) -> dict[str, Any]:
    """One `fedseek simulate` run of the workload."""
    work.mkdir(parents=True, exist_ok=True)
    scenario = work / "scenario.yaml"
    scenario.write_text(scenario_yaml(name, w, rounds))
    out = work / "out"
    res = run_fedseek_cli(scenario, out, work, root)
    rows = read_rows(out / "metrics.jsonl")
    per = _periods([(r.round, r.time) for r in rows])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    res.update({"app": "fedseek", "period_s": [round(rows[0].round_seconds, 4)] + [round(per[r], 4) for r in sorted(per)] if rows else [],
                "round_seconds": [round(r.round_seconds, 4) for r in rows],
                "startup_s": round(rows[0].time - rows[0].round_seconds - res["t0"], 2) if rows else None,
                "launch_to_round1_s": round(rows[0].time - res["t0"], 2) if rows else None,
                "final_accuracy": summary.get("final_accuracy"), "rounds_completed": len(rows)})
    return res


def steady(periods: list[float]) -> float | None:
    """Median period of rounds 2.. (round 1 includes Ray actors importing torch)."""
    return statistics.median(periods[1:]) if len(periods) > 1 else None


def _median(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the good runs of one app."""
    good = [r for r in rs if r["ok"] and len(r["period_s"]) > 1]
    steady_all = [x for r in good for x in r["period_s"][1:]]

    def med(key: str, digits: int = 2) -> float | None:
        m = _median([r.get(key) for r in good])
        return round(m, digits) if m is not None else None

    m = _median([steady(r["period_s"]) for r in good])
    return {
        "steady_round_s": round(m, 4) if m else None,
        "steady_round_mean_s": round(statistics.mean(steady_all), 4) if steady_all else None,
        "steady_round_min_s": round(min(steady_all), 4) if steady_all else None,
        "launch_to_round1_s": med("launch_to_round1_s"), "startup_s": med("startup_s"), "wall_s": med("wall_s"), "cpu_s": med("cpu_s", 1),
        "peak_pss_mb": med("peak_pss_mb", 1), "runs_ok": len(good),
    }


def aggregate(w: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-app medians over the repeats, the fedseek / plain ratios and the goals (from the stored per-run data)."""
    agg = {kind: _summary(rs) for kind, rs in runs.items()}
    f, p = agg["fedseek"], agg["plain-flower"]

    def ratio(key: str) -> float | None:
        return round(f[key] / p[key], 3) if f.get(key) and p.get(key) else None

    both = f.get("launch_to_round1_s") is not None and p.get("launch_to_round1_s") is not None
    out: dict[str, Any] = {
        "workload": w, "summary": agg,
        "steady_round_ratio": ratio("steady_round_s"), "steady_round_mean_ratio": ratio("steady_round_mean_s"),
        "steady_round_min_ratio": ratio("steady_round_min_s"), "wall_ratio": ratio("wall_s"), "cpu_ratio": ratio("cpu_s"),
        "launch_to_round1_extra_s": round(f["launch_to_round1_s"] - p["launch_to_round1_s"], 2) if both else None,
    }
    out["goals"] = {k: {"goal": g, "value": out[k], "met": out[k] is not None and out[k] <= g} for k, g in GOALS.items()}
    out["goal_met"] = all(v["met"] for v in out["goals"].values())
    out["runs"] = runs
    return out


def _one(kind: str, name: str, w: dict[str, Any], rounds: int, work: Path, plain_dir: Path, root: Path) -> dict[str, Any]:
    r = run_plain(plain_dir, w, rounds, work) if kind == "plain-flower" else run_fedseek(name, w, rounds, work, root)
    r["steady_round_s"] = steady(r["period_s"])
    r.pop("t0", None)
    print(f"{name} {kind}: ok={r['ok']} wall {r['wall_s']:.1f}s cpu {r['cpu_s']}s round1 at {r['launch_to_round1_s']}s "
          f"steady {r['steady_round_s']}s "
          f"acc {r['final_accuracy']} pss {r['peak_pss_mb']} MB load {os.getloadavg()[0]:.2f} {r['error'] or ''}", flush=True)
    return r


def run_workload(name: str, rounds: int, repeats: int, base: Path, plain_dir: Path, root: Path = ROOT) -> dict[str, Any]:
    """`repeats` pairs of runs in ABBA order, aggregated."""
    w = WORKLOADS[name]
    runs: dict[str, list[dict[str, Any]]] = {"plain-flower": [], "fedseek": []}
    for i in range(repeats):
        for kind in ("plain-flower", "fedseek") if i % 2 == 0 else ("fedseek", "plain-flower"):
            runs[kind].append(_one(kind, name, w, rounds, base / f"{name}-{kind}-{i}", plain_dir, root))
    res = aggregate(w, runs)
    f, p = res["summary"]["fedseek"], res["summary"]["plain-flower"]
    print(f"== {name}: steady round {f['steady_round_s']}s vs {p['steady_round_s']}s -> {res['steady_round_ratio']}x; "
          f"round 1 at {f['launch_to_round1_s']}s vs {p['launch_to_round1_s']}s -> {res['launch_to_round1_extra_s']:+}s; "
          f"wall {f['wall_s']}s vs {p['wall_s']}s -> {res['wall_ratio']}x; cpu {f['cpu_s']}s vs {p['cpu_s']}s -> {res['cpu_ratio']}x; "
          f"goals met: {res['goal_met']}", flush=True)
    return res


def main() -> None:
    """Run the workloads and write the results JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hospitals only, 2 repeats, 10 rounds")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=None, help="default: per workload")
    ap.add_argument("--workloads", default="hospitals,banks100,digits")
    ap.add_argument("--out", type=Path, default=RESULTS / "platform_overhead.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep run directories here (default: a temp dir, removed)")
    ap.add_argument("--fedseek-root", type=Path, default=ROOT, help="run the fedseek of this checkout (e.g. an older one, to compare)")
    ap.add_argument("--reaggregate", action="store_true", help="recompute the summaries and ratios of --out from its stored runs; run nothing")
    args = ap.parse_args()
    if args.reaggregate:
        data = json.loads(args.out.read_text())
        for name, wl in data["workloads"].items():
            data["workloads"][name] = aggregate(wl["workload"], wl["runs"])
        data["method"] = METHOD
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"re-aggregated {args.out}")
        return
    names = ["hospitals"] if args.quick else [n for n in args.workloads.split(",") if n]
    repeats = 2 if args.quick else args.repeats
    out: dict[str, Any] = {"benchmark": "platform overhead (issue 13): `fedseek simulate` vs a minimal plain-Flower app, launch to exit",
                           "goals": GOALS, "machine": machine(), "method": METHOD, "repeats": repeats,
                           "fedseek_root": str(args.fedseek_root.resolve()), "workloads": {}}
    t_start = time.time()
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="fedseek-overhead-") as tmp:
        base = args.keep or Path(tmp)
        plain_dir = write_plain_app(base / "plainapp")
        for name in names:
            rounds = 10 if args.quick else int(args.rounds or WORKLOADS[name]["rounds"])
            out["workloads"][name] = run_workload(name, rounds, repeats, base, plain_dir, args.fedseek_root.resolve())
    out["benchmark_seconds"] = round(time.time() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['benchmark_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
