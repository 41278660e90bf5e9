"""Serving latency: `fedseek serve` answering one row per request at a fixed rate on loopback (issue 18).

For an MLP on breast cancer (30 columns) and one on digits (64 pixel columns), each trained for a few rounds
in-process on the dataset as a table (`fedseek serve` answers table rows; a CNN trained on an image folder cannot be
served yet, its module latency is in results/delivery.json), fp32 and INT8 (`fedseek quantize`), with the output
watermark on (a fresh key; marked answers are logged):

* open loop: requests sent on a fixed schedule (`--rate` per second for `--seconds`) by a pool of client threads,
  each one row of the central test set as JSON; latency = response time minus the *scheduled* send time, so a
  server that falls behind is charged for the queue it builds (no coordinated omission); p50 / p90 / p99 / max;
* closed loop: `--clients` clients sending back to back for `--seconds`: the throughput the server sustains.

The server is a real subprocess (uvicorn, loopback, started and stopped by pid); the client threads share the same
2 cores, as a co-located client would. Goal (issue 18): p99 <= 20 ms at 100 requests/s on 2 cores.
Writes benchmarks/results/serve_latency.json.

    .venv/bin/python benchmarks/serve_latency.py [--rate 100] [--seconds 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import environment  # noqa: E402

MODELS = {"breast_cancer_mlp": ("breast_cancer", [64]), "digits_mlp": ("digits", [128])}


def _table(dataset: str, path: Path) -> None:
    """scikit-learn's copy of the dataset as a CSV table with named columns and a label column `y`."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer, load_digits

    bunch = load_breast_cancer() if dataset == "breast_cancer" else load_digits()
    df = pd.DataFrame(bunch.data, columns=[f"f{i}" for i in range(bunch.data.shape[1])])
    df["y"] = bunch.target
    df.to_csv(path, index=False)


def train_run(name: str, work: Path) -> Path:
    """A short federated run on the dataset as a table (10 sites, 5 rounds, in-process, scaling: federated so single rows
    can be answered); its run directory, with a watermark key."""
    import logging

    from tests.test_coordinator import run_in_process

    logging.disable(logging.WARNING)
    dataset, hidden = MODELS[name]
    _table(dataset, work / f"{dataset}.csv")
    cfg = {"name": name, "seed": 1, "num_sites": 10, "rounds": 5,
           "data": {"table": f"{dataset}.csv", "label_column": "y", "test_fraction": 0.25, "preprocessing": {"scaling": "federated"}},
           "partition": {"scheme": "iid"}, "model": {"kind": "mlp", "hidden": hidden}, "strategy": {"min_sites": 10},
           "train": {"local_epochs": 2, "lr": 0.05, "batch_size": 16}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / name
    run_in_process(path, out, 10)
    from fedseek import watermark as wm

    card = json.loads((out / "model.json").read_text())
    wm.save_key(wm.keygen(tuple(card["input_shape"]), int(card["num_classes"]), None, model_id=name), out / "watermark.key")
    return out


def quantize(run: Path, work: Path) -> Path:
    """`fedseek quantize` of the run (synthetic calibration rows for the CNN)."""
    out = work / f"{run.name}-int8"
    res = subprocess.run([sys.executable, "-m", "fedseek", "quantize", str(run), "--out", str(out), "--calibration", "synthetic"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"fedseek quantize {run}: {res.stderr.strip()[-500:]}")
    return out


def test_rows(work: Path, name: str, n: int = 200) -> list[dict[str, float]]:
    """Rows of the table (without the label), as a client would send them."""
    import pandas as pd

    df = pd.read_csv(work / f"{MODELS[name][0]}.csv").drop(columns="y").head(n)
    return [{k: float(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


class Server:
    """`fedseek serve RUN` on a free loopback port; stopped by pid."""

    def __init__(self, run: Path, log: Path, *extra: str) -> None:
        from fedseek.ops.processes import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "fedseek", "serve", str(run), "--port", str(self.port), *extra],
                                     cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedseek serve {run} exited: {log.read_text()[-1000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fedseek serve {run} did not answer /health within 120 s")

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/health", timeout=5).json())

    def stop(self) -> None:
        from fedseek.ops.processes import stop_child

        stop_child(self.proc)
        self.log.close()


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2),
            "mean_ms": round(float(a.mean()), 2)}


def open_loop(url: str, rows: list[dict[str, float]], rate: float, seconds: float, threads: int = 8) -> dict[str, Any]:
    """Requests on a fixed schedule; latency from the scheduled send time (a late send counts against the server).

    Each client thread opens its connection and sends warm-up requests before the schedule starts, so no connection
    set-up falls inside the measurement.
    """
    n = int(rate * seconds)
    local = threading.local()
    errors: list[str] = []
    ready = threading.Barrier(threads + 1)

    def init() -> None:
        local.c = httpx.Client(base_url=url, timeout=10)
        for i in range(5):
            local.c.post("/predict", json={"rows": [rows[i % len(rows)]]})
        ready.wait()

    def one(i: int, t0: float) -> tuple[float, float]:
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter()
        r = local.c.post("/predict", json={"rows": [rows[i % len(rows)]]})
        done = time.perf_counter()
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:100]}")
        return (done - due) * 1e3, (done - sent) * 1e3

    with ThreadPoolExecutor(max_workers=threads, initializer=init) as pool:
        warm = [pool.submit(time.sleep, 0) for _ in range(threads)]  # starts every thread (each runs init first)
        ready.wait()
        for f in warm:
            f.result()
        t0 = time.perf_counter() + 0.2
        res = list(pool.map(lambda i: one(i, t0), range(n)))
    wall = time.perf_counter() - t0
    return {"requests": n, "rate_target": rate, "rate_achieved": round(n / wall, 1), "errors": len(errors), "error_sample": errors[:3],
            "client_threads": threads, "from_schedule": _percentiles([r[0] for r in res]), "service": _percentiles([r[1] for r in res])}


def closed_loop(url: str, rows: list[dict[str, float]], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads sending back to back: sustained requests per second."""
    stop = time.perf_counter() + seconds
    counts, lat = [0] * clients, [[] for _ in range(clients)]  # type: list[int], list[list[float]]

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            i = k
            while time.perf_counter() < stop:
                s = time.perf_counter()
                c.post("/predict", json={"rows": [rows[i % len(rows)]]})
                lat[k].append((time.perf_counter() - s) * 1e3)
                counts[k] += 1
                i += clients

    ts = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"clients": clients, "seconds": seconds, "requests_per_s": round(sum(counts) / seconds, 1),
            "latency": _percentiles([x for xs in lat for x in xs])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_latency.json")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in MODELS:
            run = train_run(name, work)
            rows = test_rows(work, name)
            for variant, path in (("fp32", run), ("int8", quantize(run, work))):
                server = Server(path, work / f"{name}-{variant}.log", "--watermark-key", str(run / "watermark.key"))
                try:
                    health = server.health()
                    ol = open_loop(server.url, rows, args.rate, args.seconds)
                    cl = closed_loop(server.url, rows, args.clients, min(args.seconds, 10.0))
                finally:
                    server.stop()
                key = f"{name}/{variant}"
                results[key] = {"output_watermark": health.get("output_watermark"), "int8": health.get("int8"), "open_loop": ol, "closed_loop": cl}
                print(f"{key:26s} open loop {ol['rate_achieved']}/s: p50 {ol['from_schedule']['p50_ms']} ms, p99 "
                      f"{ol['from_schedule']['p99_ms']} ms, errors {ol['errors']}; closed loop {cl['requests_per_s']}/s", flush=True)
    goal = {k: v["open_loop"]["from_schedule"]["p99_ms"] <= 20.0 and v["open_loop"]["errors"] == 0 for k, v in results.items()}
    out = {"benchmark": "serve_latency", "environment": environment(), "rate": args.rate, "seconds": args.seconds,
           "goal": "p99 <= 20 ms at 100 requests/s on 2 cores, no errors", "goal_met": goal, "results": results,
           "median_p99_ms": statistics.median(v["open_loop"]["from_schedule"]["p99_ms"] for v in results.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(goal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
