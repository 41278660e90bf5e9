"""Smaller models for the sites (issue 19): fp32 vs INT8, and teacher vs federated-distilled student, with and without DP.

INT8: the fp32 models are real federations (`fedseek simulate`: breast cancer, 10 hospitals, MLP
[64]; digits, 20 sites, the GroupNorm CNN), quantized with `fedseek quantize` (dynamic INT8 for the
MLP, static INT8 with synthetic calibration for the CNN). Latency: median of 50 timed calls after 10
warm-up calls, batch 1 and batch 256, on this machine's CPU with PyTorch's default threads.

Distillation: each of those federations is the teacher of a federated student (`distill:`): the
same sites train a smaller MLP on their own records with loss 0.5 * CE + 0.5 * T^2 * KL (T = 3), and
the same student architecture is trained on the labels alone (alpha 1) for comparison. Under DP
(digits, epsilon 8 per site over teacher AND student: the student run spends from the teacher run's
ledgers), the teacher plans 45 rounds and runs 30, the student the remaining 15. The larger CNN on an
image folder, on a GPU, is benchmarks/delivery_images.py.

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
from _common import QUICK_DIR, RESULTS, _run, breast_cancer_scenario, digits_scenario, environment, log, merge, write_json

from fedseek.data import load_builtin
from fedseek.serving import int8_file
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


DP = {"epsilon_budget": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp", "grad_sample_mode": "ghost"}
DP_TRAIN = {"local_epochs": 1, "lr": 0.15, "batch_size": 16, "momentum": 0.9}  # benchmarks/communication.py's DP recipe


def _student(work: Path, tag: str, base: dict[str, Any], teacher: Path, hidden: list[int], alpha: float, **over: Any) -> dict[str, Any]:
    """One federated student run; its summary's distillation comparison, accuracy and privacy."""
    import json

    sc = merge(base, {"name": tag, "model": {"kind": "mlp", "hidden": hidden}, "distill": {"teacher": str(teacher), "alpha": alpha}, **over})
    r = _run(sc, work, tag)
    if "error" in r:
        return r
    summary = json.loads((work / f"out-{tag}" / "summary.json").read_text())
    d = summary["distillation"]
    return {"accuracy": summary["final_accuracy"], "rounds": summary["rounds_completed"], "wall_seconds": r["wall_seconds"],
            "max_epsilon": (summary.get("privacy") or {}).get("max_epsilon"), "alpha": alpha, "hidden": hidden, "models": d["models"]}


def distillation(work: Path, quick: bool) -> dict[str, Any]:
    """Teacher vs student on both demo tasks (non-DP), and on digits under DP within one budget."""
    out: dict[str, Any] = {}
    short = {"rounds": 3} if quick else {}
    for ds, base, hidden, student_over in (
            ("digits", digits_scenario(rounds=20, train={"lr": 0.1}), [16], short),
            ("breast_cancer", breast_cancer_scenario(rounds=10), [4], short)):
        teacher = work / f"out-{ds}"
        rows = {"distilled": _student(work, f"{ds}-student", base, teacher, hidden, 0.5, **student_over),
                "labels only": _student(work, f"{ds}-labels", base, teacher, hidden, 1.0, **student_over)}
        t = rows["distilled"]["models"][0] if "models" in rows["distilled"] else {}
        entry: dict[str, Any] = {"teacher": t, "students": rows}
        if t and "accuracy" in rows["distilled"]:
            s = rows["distilled"]["models"][1]
            entry["parameter_ratio"] = s["parameters"] / t["parameters"]
            entry["accuracy_ratio"] = s["accuracy"] / t["accuracy"]
            log(f"{ds}: teacher {t['accuracy']:.4f} ({t['parameters']:,} parameters); student distilled {s['accuracy']:.4f}, labels only "
                f"{rows['labels only'].get('accuracy')} ({s['parameters']:,} parameters, {entry['parameter_ratio']:.3f} of the teacher); "
                f"accuracy ratio {entry['accuracy_ratio']:.3f}")
        out[ds] = entry
    # DP: teacher and student spend one epsilon-8 budget per site (the student run keeps the teacher run's ledgers)
    rounds_t, rounds_s = (3, 2) if quick else (30, 15)
    privacy = {**DP, "planning_rounds": rounds_t + rounds_s}
    tsc = digits_scenario(name="digits-dp-teacher", rounds=rounds_t, train=DP_TRAIN, privacy=privacy)
    tr = _run(tsc, work, "digits-dp-teacher")
    dp: dict[str, Any] = {"teacher": {k: tr.get(k) for k in ("final_accuracy", "max_epsilon", "rounds_completed", "error") if k in tr},
                          "privacy": privacy, "train": DP_TRAIN}
    base = digits_scenario(rounds=rounds_s, train=DP_TRAIN, privacy=privacy)
    dp["students"] = {"distilled": _student(work, "digits-dp-student", base, work / "out-digits-dp-teacher", [16], 0.5)}
    log(f"digits DP: teacher {dp['teacher']}; student {({k: v for k, v in dp['students']['distilled'].items() if k != 'models'})}")
    out["digits_dp"] = dp
    return out


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
            "file_bytes_fp32": q.fp32_bytes, "file_bytes_int8": q.int8_bytes, "file_ratio": q.fp32_bytes / q.int8_bytes,
            "state_bytes_fp32": state_bytes(fp32), "parameters": int(sum(p.numel() for p in fp32.parameters())),
            "fp32_bytes_same_format": len(int8_file.dumps(fp32.state_dict())),  # fp32 weights in the INT8 file's packing
            "latency_ms": {f"{kind}_batch{b}": latency_ms(m, test.x, b) for kind, m in (("fp32", fp32), ("int8", int8)) for b in (1, 256)},
        }
        lat = entry["latency_ms"]
        entry["speedup_batch256"] = lat["fp32_batch256"] / lat["int8_batch256"]
        entry["speedup_batch1"] = lat["fp32_batch1"] / lat["int8_batch1"]
        results["models"][ds] = entry
        log(f"{ds}: accuracy {entry['accuracy_fp32']:.4f} -> {entry['accuracy_int8']:.4f} (agreement {entry['agreement']:.4f}); "
            f"file {q.fp32_bytes:,} -> {q.int8_bytes:,} bytes; batch 256 {lat['fp32_batch256']:.3f} -> {lat['int8_batch256']:.3f} ms "
            f"({entry['speedup_batch256']:.2f}x); batch 1 {lat['fp32_batch1']:.3f} -> {lat['int8_batch1']:.3f} ms")
    results["distillation"] = distillation(work, args.quick)
    path = (QUICK_DIR if args.quick else RESULTS) / "delivery.json"
    write_json(path, results)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
