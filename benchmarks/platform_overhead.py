"""Platform overhead: a fedseek simulation round vs a minimal plain-Flower app doing the same training.

Goal (issue 8): fedseek steady-state round time <= 1.15x the plain app's.

The plain app is written into a temp dir: a Flower App (pyproject [tool.flwr.app]) whose
ClientApp trains the same fedseek MLP with the same training loop (fedseek.train.local.train_local)
on the same partition of the same built-in dataset (fedseek.data: same seed, scheme, alpha) for
the same epochs / lr / batch, and whose ServerApp runs flwr.serverapp.strategy.FedAvg.start
with the same central evaluation each round (fedseek.train.local.evaluate on the same test
split) and no federated evaluation, exactly like fedseek's coordinator. What fedseek adds is
therefore its platform layer: site discovery, seeded sampling, delta encoding + screening of
every reply, per-site views, metrics.jsonl (fsync'd), an atomic checkpoint per round, the audit
log (and, when configured: DP ledgers, compression, sparsity, watermark, Prometheus).

Both apps run the same way fedseek simulate runs: a private `flower-superlink --simulation`
on a free loopback port, `flwr run --format json`, status polled through the Control API
(fedseek.ops.processes / fedseek.ops.flower_control), every process stopped by pid afterwards. Runs
alternate (plain, fedseek, plain, fedseek, ...) so drifting load on the shared cores hits both.

Per-round period = time between consecutive round-end stamps (fedseek: metrics.jsonl "time";
plain: the central-evaluation callback), so both include everything a round costs; round 1
(Ray actors importing torch) is excluded from the steady state. Total wall = SuperLink start to
the run's finished status.

Writes benchmarks/results/platform_overhead.json.
Run: .venv/bin/python benchmarks/platform_overhead.py [--quick] [--repeats N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import TreeMemory, cores, machine  # noqa: E402

from fedseek.ops.flower_control import ControlClient, flower_env, flwr_bin, submit_run, write_connection  # noqa: E402
from fedseek.ops.processes import free_port, start_process, wait_for_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GOAL = 1.15
CONNECTION = "bench"

# The shared workload (fedseek's default `make demo` scenario, minus its Prometheus endpoint).
WORKLOADS = {
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

PLAIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "plainbench"
version = "1.0.0"
description = "Minimal plain-Flower baseline for benchmarks/platform_overhead.py"
license = {text = "Apache-2.0"}
dependencies = ["flwr[simulation]>=1.41.0"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plainbench.server_app:app"
clientapp = "plainbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
num-sites = 10
dataset = "breast_cancer"
data-options = ""
test-fraction = 0.25
scheme = "iid"
alpha = 1.0
seed = 0
kind = "mlp"
hidden = "[64]"
momentum = 0.0
local-epochs = 1
lr = 0.05
batch-size = 16
out-dir = ""
"""

PLAIN_TASK = '''\
"""Data and model shared by the plain ClientApp and ServerApp: fedseek's, unchanged."""

import functools
import json

from fedseek.data import load_builtin, partition_indices


def _options(text):
    """'num_banks:100,rows_per_bank:200' -> {'num_banks': 100, 'rows_per_bank': 200}."""
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split(":", 1)
        out[k] = json.loads(v)
    return out


@functools.lru_cache(maxsize=2)
def splits(dataset, options, seed, test_fraction):
    return load_builtin(dataset, seed, test_fraction=test_fraction, **_options(options))


@functools.lru_cache(maxsize=2)
def partitions(dataset, options, seed, test_fraction, num_sites, scheme, alpha):
    train, _ = splits(dataset, options, seed, test_fraction)
    return partition_indices(train.y, num_sites, scheme, alpha=alpha, seed=seed, min_partition_size=2,
                             groups=getattr(train, "groups", None))


def key(rc):
    return (str(rc["dataset"]), str(rc["data-options"]), int(rc["seed"]), float(rc["test-fraction"]))
'''

PLAIN_CLIENT = '''\
"""Minimal plain-Flower ClientApp: train fedseek's MLP on this node's partition, return the weights."""

import json

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseek.train.models import build_model
from fedseek.train.local import train_local
from plainbench.task import key, partitions, splits

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    rc = context.run_config
    pid = int(context.node_config["partition-id"])
    train_set, _ = splits(*key(rc))
    idx = partitions(*key(rc), int(rc["num-sites"]), str(rc["scheme"]), float(rc["alpha"]))[pid]
    x, y = train_set.x[idx], train_set.y[idx]
    model = build_model(str(rc["kind"]), train_set.input_shape, int(train_set.num_classes), json.loads(str(rc["hidden"])))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    res = train_local(model, x, y, num_classes=int(train_set.num_classes), epochs=int(rc["local-epochs"]), lr=float(rc["lr"]),
                      batch_size=int(rc["batch-size"]), momentum=float(rc["momentum"]), seed=int(rc["seed"]) * 100003 + rnd * 1009 + pid)
    metrics = MetricRecord({"train-loss": float(res.loss), "num-examples": int(res.num_examples)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
'''

PLAIN_SERVER = '''\
"""Minimal plain-Flower ServerApp: FedAvg.start with central evaluation each round, round-end stamps to a file."""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedseek.train.models import build_model
from fedseek.train.local import evaluate
from plainbench.task import key, splits

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n = int(rc["num-sites"])
    _, test = splits(*key(rc))
    hidden = json.loads(str(rc["hidden"]))
    out = Path(str(rc["out-dir"])) / "plain_rounds.jsonl"
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < n and time.monotonic() < deadline:  # Flower samples too few otherwise
        time.sleep(0.5)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(str(rc["kind"]), test.input_shape, int(test.num_classes), hidden)
        model.load_state_dict(arrays.to_torch_state_dict())
        m = evaluate(model, test.x, test.y, int(test.num_classes))
        with open(out, "a") as fh:
            fh.write(json.dumps({"round": server_round, "time": time.time(), **m}) + "\\n")
        return MetricRecord({k: float(v) for k, v in m.items()})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(str(rc["kind"]), test.input_shape, int(test.num_classes), hidden,
                                                                       seed=int(rc["seed"])).state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), train_config=ConfigRecord({"lr": float(rc["lr"])}), evaluate_fn=central)
'''


METHOD = {
    "runner": "both apps: private flower-superlink --simulation, flwr run --format json, Control API polled every 0.2 s, stopped by pid",
    "same_work": "same dataset split and partitions, same model, same train_local loop / epochs / lr / batch / momentum, same central "
                 "evaluation each round, no federated evaluation (identical final accuracy in every pair confirms it)",
    "period": "seconds between consecutive round ends; round 1 excluded (Ray actor start)",
    "steady_round_s": "median over rounds 2.. per run, then median over repeats; the goal is judged on this ratio",
    "steady_round_mean_s / min_s": "mean / minimum over every steady round of every repeat",
    "order": "plain and fedseek alternate, repeats times",
    "quantization": "Flower's simulation engine feeds messages to the actors every 0.1 s (vce_api.add_messages_to_queue) and the grid "
                    "pulls replies on a similar interval, so round times come in ~0.1 s steps: for rounds of ~0.1 s (hospitals) a few "
                    "ms of extra work can push a round into the next step (0.11 -> 0.21 s), and the ratio flips between ~1.1x and ~2x "
                    "from one session to the next",
    "startup": "fedseek: to the start of round 1 (includes Ray actor start, because the site-discovery query is the first call); "
               "plain: to the initial central evaluation (before any actor starts); to_end_of_round1_s (start-up + round 1) is comparable",
    "wall_s": "SuperLink start to the run's finished status; fedseek's extra start-up includes `flwr run` building the FAB from the "
              "repo root (Flower walks every file under it, .venv included, before applying fab-include: ~4 s vs ~0.9 s for the "
              "plain app, measured with `flwr build`) and importing opacus in every Ray actor (fedseek.runtime.site imports "
              "fedseek.privacy.ledger at module level: ~1.4 s, DP on or off)",
    "not_in_plain": "site discovery query, seeded sampling by site name, delta encoding + validation of each reply, per-site views, "
                    "metrics.jsonl, checkpoint, audit log",
}


def write_plain_app(root: Path) -> Path:
    (root / "plainbench").mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    (root / "plainbench" / "__init__.py").write_text("")
    (root / "plainbench" / "task.py").write_text(PLAIN_TASK)
    (root / "plainbench" / "client_app.py").write_text(PLAIN_CLIENT)
    (root / "plainbench" / "server_app.py").write_text(PLAIN_SERVER)
    return root


def scenario_yaml(name: str, w: dict[str, Any], rounds: int) -> str:
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


def run_app(app_dir: Path, run_config: dict[str, Any], num_sites: int, work: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """Run a Flower App on a private simulation SuperLink, the way fedseek simulate does; wall time + memory."""
    work.mkdir(parents=True, exist_ok=True)
    flwr_home = work / ".flwr"
    env = flower_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
    fed = {"num-supernodes": num_sites, "client-resources-num-cpus": 1, "init-args-num-cpus": cores()}
    trees, client, status, error, flower_stats = [], None, None, None, {}
    t0 = time.time()
    with open(work / "flower.log", "ab") as log, TreeMemory(interval=0.5) as mem:
        try:
            superlink = start_process(
                [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
                 "--port", str(port), "--database", str(flwr_home / "state.db"), "--disable-runtime-dependency-installation"],
                env=env, log=log, name="superlink")
            trees.append(superlink)
            wait_for_port("127.0.0.1", port, 60, superlink.proc)
            run_id = submit_run(app_dir, CONNECTION, env, run_config, fed)
            client = ControlClient(flwr_home, CONNECTION)
            deadline = time.monotonic() + timeout_s
            while True:
                superlink.sample()
                status = client.status(run_id)
                if status.finished or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            wall = time.time() - t0
            flower_stats = _flwr_ls(run_id, env)
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            error = f"{type(exc).__name__}: {exc}"
        finally:
            wall = wall if "wall" in locals() else time.time() - t0
            if client is not None:
                client.close()
            for tree in reversed(trees):
                tree.stop()
    ok = error is None and status is not None and status.ok
    return {"ok": ok, "status": str(status) if status else None, "error": error, "t0": t0, "wall_s": wall, "flower": flower_stats, **mem.result()}


def _flwr_ls(run_id: int, env: dict[str, str]) -> dict[str, Any]:
    """What Flower itself recorded for the run (network traffic, ServerApp / ClientApp compute time)."""
    import subprocess

    try:
        res = subprocess.run([flwr_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
        start = res.stdout.find("{")
        data = json.loads(res.stdout[start:]) if start >= 0 else {}
        runs = data.get("runs") or []
        run = runs[0] if runs else {}
        return {k: v for k, v in run.items() if any(w in k for w in ("traffic", "compute", "bytes", "time", "elapsed", "duration"))}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def _periods(stamps: list[tuple[int, float]]) -> dict[int, float]:
    """Round -> seconds since the previous round's end (round 0 = initial evaluation)."""
    stamps = sorted(stamps)
    return {r: t - tp for (rp, tp), (r, t) in zip(stamps, stamps[1:], strict=False) if r == rp + 1}


def run_plain(app_dir: Path, name: str, w: dict[str, Any], rounds: int, work: Path) -> dict[str, Any]:
    # "k:v,k:v": Flower's --run-config parser rejects quotes (and spaces) inside a string value
    rc = {"num-server-rounds": rounds, "num-sites": w["num_sites"], "dataset": w["dataset"],
          "data-options": ",".join(f"{k}:{v}" for k, v in w["options"].items()),
          "test-fraction": w["test_fraction"], "scheme": w["scheme"], "alpha": w["alpha"], "seed": w["seed"], "kind": w["kind"],
          "hidden": json.dumps(w["hidden"], separators=(",", ":")), "momentum": float(w["momentum"]), "local-epochs": w["epochs"], "lr": float(w["lr"]),
          "batch-size": w["batch"], "out-dir": str(work)}
    res = run_app(app_dir, rc, w["num_sites"], work)
    rows = [json.loads(line) for line in (work / "plain_rounds.jsonl").read_text().splitlines()] if (work / "plain_rounds.jsonl").exists() else []
    per = _periods([(int(r["round"]), float(r["time"])) for r in rows])
    res.update({"app": "plain-flower", "period_s": [round(per[r], 4) for r in sorted(per)],
                "startup_s": round(rows[0]["time"] - res["t0"], 2) if rows else None,
                "final_accuracy": rows[-1]["accuracy"] if rows else None, "rounds_completed": max(per) if per else 0})
    return res


def run_fedseek(name: str, w: dict[str, Any], rounds: int, work: Path) -> dict[str, Any]:
    from fedseek.ops.simulate import app_dir
    from fedseek.outputs.store import read_metrics

    work.mkdir(parents=True, exist_ok=True)
    scenario = work / "scenario.yaml"
    scenario.write_text(scenario_yaml(name, w, rounds))
    out = work / "out"
    rc = {"config-path": str(scenario), "out-dir": str(out), "config-kind": "scenario", "resume": False}
    res = run_app(app_dir(), rc, w["num_sites"], work)
    rows = read_metrics(out / "metrics.jsonl")
    per = _periods([(int(r["round"]), float(r["time"])) for r in rows])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    res.update({"app": "fedseek", "period_s": [round(rows[0]["round_seconds"], 4)] + [round(per[r], 4) for r in sorted(per)] if rows else [],
                "round_seconds": [round(float(r["round_seconds"]), 4) for r in rows],
                "startup_s": round(rows[0]["time"] - rows[0]["round_seconds"] - res["t0"], 2) if rows else None,
                "final_accuracy": summary.get("final_accuracy"), "rounds_completed": len(rows)})
    return res


def steady(periods: list[float]) -> float | None:
    """Median period of rounds 2.. (round 1 includes Ray actors importing torch)."""
    return statistics.median(periods[1:]) if len(periods) > 1 else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def aggregate(w: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-app medians over the repeats and the fedseek / plain ratios (from the stored per-run data)."""
    agg: dict[str, dict[str, Any]] = {}
    for kind, rs in runs.items():
        good = [r for r in rs if r["ok"] and len(r["period_s"]) > 1]
        steady_all = [x for r in good for x in r["period_s"][1:]]
        med = _median([steady(r["period_s"]) for r in good])
        agg[kind] = {
            "steady_round_s": round(med, 4) if med else None,
            "steady_round_mean_s": round(statistics.mean(steady_all), 4) if steady_all else None,
            "steady_round_min_s": round(min(steady_all), 4) if steady_all else None,
            "wall_s": round(_median([r["wall_s"] for r in good]), 2) if good else None,
            "startup_s": round(_median([r["startup_s"] for r in good]), 2) if good else None,
            "to_end_of_round1_s": round(_median([r["startup_s"] + r["period_s"][0] for r in good]), 2) if good else None,
            "peak_pss_mb": round(_median([r["peak_pss_mb"] for r in good]), 1) if good else None,
            "runs_ok": len(good),
        }
    f, p = agg["fedseek"], agg["plain-flower"]

    def ratio(key: str) -> float | None:
        return round(f[key] / p[key], 3) if f.get(key) and p.get(key) else None

    r = ratio("steady_round_s")
    return {
        "workload": w,
        "summary": agg,
        "steady_round_ratio": r,
        "steady_round_mean_ratio": ratio("steady_round_mean_s"),
        "steady_round_min_ratio": ratio("steady_round_min_s"),
        "steady_round_extra_s": round(f["steady_round_s"] - p["steady_round_s"], 4) if r else None,
        "wall_ratio": ratio("wall_s"),
        "to_end_of_round1_extra_s": round(f["to_end_of_round1_s"] - p["to_end_of_round1_s"], 2) if f.get("to_end_of_round1_s") and p.get("to_end_of_round1_s") else None,
        "goal_met": (r <= GOAL) if r else None,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hospitals only, 2 repeats, 10 rounds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="default: per workload")
    ap.add_argument("--workloads", default="hospitals,banks100,digits")
    ap.add_argument("--out", type=Path, default=RESULTS / "platform_overhead.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep run directories here (default: a temp dir, removed)")
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
    out: dict[str, Any] = {
        "benchmark": "platform overhead (issue 8): fedseek simulation round vs a minimal plain-Flower app doing the same training",
        "goal": f"fedseek steady-state round time <= {GOAL}x plain Flower",
        "machine": machine(),
        "method": METHOD,
        "repeats": repeats,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="fedseek-overhead-") as tmp:
        base = args.keep or Path(tmp)
        plain_dir = write_plain_app(base / "plainapp")
        for name in names:
            w = WORKLOADS[name]
            rounds = 10 if args.quick else (args.rounds or w["rounds"])
            runs: dict[str, list[dict[str, Any]]] = {"plain-flower": [], "fedseek": []}
            for i in range(repeats):
                for kind in ("plain-flower", "fedseek") if i % 2 == 0 else ("fedseek", "plain-flower"):
                    work = base / f"{name}-{kind}-{i}"
                    r = run_plain(plain_dir, name, w, rounds, work) if kind == "plain-flower" else run_fedseek(name, w, rounds, work)
                    r["steady_round_s"] = steady(r["period_s"])
                    r.pop("t0", None)
                    runs[kind].append(r)
                    print(f"{name} {kind} #{i}: ok={r['ok']} wall {r['wall_s']:.1f}s startup {r['startup_s']}s "
                          f"steady {r['steady_round_s']}s acc {r['final_accuracy']} pss {r['peak_pss_mb']} MB {r['error'] or ''}", flush=True)
            out["workloads"][name] = aggregate(w, runs)
            f, pl = out["workloads"][name]["summary"]["fedseek"], out["workloads"][name]["summary"]["plain-flower"]
            ratio, wall_ratio = out["workloads"][name]["steady_round_ratio"], out["workloads"][name]["wall_ratio"]
            print(f"== {name}: steady round fedseek {f['steady_round_s']}s vs plain {pl['steady_round_s']}s -> {ratio}x "
                  f"(mean {out['workloads'][name]['steady_round_mean_ratio']}x; goal <= {GOAL}); wall {f['wall_s']}s vs {pl['wall_s']}s -> {wall_ratio}x",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
