"""Smaller models for the sites (issue 19), the INT8 part: fp32 vs INT8 accuracy, model bytes and CPU latency.

The fp32 models are real federations (`fedseek simulate`: breast cancer, 10 hospitals, MLP [64];
digits, 20 sites, the GroupNorm CNN), quantized with `fedseek quantize` (dynamic INT8 for the MLP,
static INT8 with synthetic calibration for the CNN). Latency: median of 50 timed calls after 10
warm-up calls, batch 1 and batch 256, on this machine's CPU with PyTorch's default threads.
Federated distillation (the student part of issue 19) is not built yet.

Usage: .venv/bin/python benchmarks/delivery.py [--quick]     writes benchmarks/results/delivery.json
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import QUICK_DIR, RESULTS, _run, breast_cancer_scenario, digits_scenario, environment, log, write_json

from fedseek.data import load_builtin
from fedseek.serving.predictor import Predictor
from fedseek.serving.quantize import quantize_run
from fedseek.train.local import predict_scores


def latency_ms(model: Any, x: np.ndarray, batch: int, calls: int = 50) -> float:
    xb = torch.as_tensor(np.resize(x, (batch, *x.shape[1:])), dtype=torch.float32)
    with torch.no_grad():
        for _ in range(10):
            model(xb)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model(xb)
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def state_bytes(model: Any) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short federations (smoke run)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseek-delivery-"))
    results: dict[str, Any] = {"environment": environment(), "threads": torch.get_num_threads(), "models": {}}
    for ds, sc in (("breast_cancer", breast_cancer_scenario(rounds=3 if args.quick else 10)),
                   ("digits", digits_scenario(rounds=3 if args.quick else 15))):
        _run(sc, work, ds)
        run = work / f"out-{ds}"
        q = quantize_run(run, run / "int8")
        fp32, int8 = Predictor(run, tables_only=False).model, Predictor(run / "int8", tables_only=False).model
        _, test = load_builtin(ds, sc["seed"], test_fraction=sc["data"].get("test_fraction", 0.25))
        p32, p8 = predict_scores(fp32, test.x).argmax(1), predict_scores(int8, test.x).argmax(1)
        entry = {
            "mode": q.mode, "calibration": q.calibration,
            "accuracy_fp32": float(np.mean(p32 == test.y)), "accuracy_int8": float(np.mean(p8 == test.y)),
            "agreement": float(np.mean(p32 == p8)),
            "file_bytes_fp32": q.fp32_bytes, "file_bytes_int8_torchscript": q.int8_bytes,
            "state_bytes_fp32": state_bytes(fp32), "parameters": int(sum(p.numel() for p in fp32.parameters())),
            "latency_ms": {f"{kind}_batch{b}": latency_ms(m, test.x, b) for kind, m in (("fp32", fp32), ("int8", int8)) for b in (1, 256)},
        }
        lat = entry["latency_ms"]
        entry["speedup_batch256"] = lat["fp32_batch256"] / lat["int8_batch256"]
        entry["speedup_batch1"] = lat["fp32_batch1"] / lat["int8_batch1"]
        results["models"][ds] = entry
        log(f"{ds}: accuracy {entry['accuracy_fp32']:.4f} -> {entry['accuracy_int8']:.4f} (agreement {entry['agreement']:.4f}); "
            f"file {q.fp32_bytes:,} -> {q.int8_bytes:,} bytes; batch 256 {lat['fp32_batch256']:.3f} -> {lat['int8_batch256']:.3f} ms "
            f"({entry['speedup_batch256']:.2f}x); batch 1 {lat['fp32_batch1']:.3f} -> {lat['int8_batch1']:.3f} ms")
    path = (QUICK_DIR if args.quick else RESULTS) / "delivery.json"
    write_json(path, results)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
