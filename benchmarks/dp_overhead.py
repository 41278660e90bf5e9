"""DP-SGD overhead: training samples/s, private (Opacus, each grad_sample_mode) vs non-private.

Writes benchmarks/results/dp_overhead.json. Goal (issue 3): private/non-private time <= 3x
for the chosen default mode. Run: .venv/bin/python benchmarks/dp_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedseek.config import PrivacySpec  # noqa: E402
from fedseek.data import load_builtin  # noqa: E402
from fedseek.privacy import DPRound, PrivacyLedger  # noqa: E402
from fedseek.train.local import train_local  # noqa: E402
from fedseek.train.models import build_model  # noqa: E402


class _NullLedger(PrivacyLedger):
    """Accounting without disk I/O: the benchmark measures training, not the ledger."""

    def __init__(self) -> None:  # noqa: D107
        self.history, self.rounds, self.refusals = [], [], []
        self.accountant, self.delta, self.epsilon_budget, self.site = "rdp", 1e-5, 1e9, "bench"
        self.calibrated_noise = None

    def save(self) -> None:  # noqa: D102
        pass


def _throughput(kind: str, hidden: list[int], x: np.ndarray, y: np.ndarray, k: int, mode: str | None, batch: int, epochs: int, repeats: int,
                device: str = "cpu", precision: str = "fp32") -> float:
    """Best-of-`repeats` samples/s after one untimed warm-up run."""
    best = 0.0
    for r in range(repeats + 1):
        model = build_model(kind, x.shape[1:], k, hidden, seed=r)
        dp = None
        if mode is not None:
            dp = DPRound(PrivacySpec(noise_multiplier=1.0, grad_sample_mode=mode), _NullLedger(), 1.0, run_id="b", server_round=r)
        t = time.perf_counter()
        res = train_local(model, x, y, num_classes=k, epochs=epochs, lr=0.05, batch_size=batch, seed=r, privacy=dp,
                          device=device, precision=precision)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n = res.num_examples * epochs
        if r > 0:
            best = max(best, n / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats, epochs = (1, 1) if args.quick else (3, 3)
    results = []
    tasks = [("mlp", [64], "breast_cancer"), ("mlp", [256, 256], "breast_cancer"), ("cnn", [], "digits")]
    for kind, hidden, ds in tasks:
        train, _ = load_builtin(ds, 0)
        x, y, k = train.x, train.y, train.num_classes
        for batch in (64, 256):
            base = _throughput(kind, hidden, x, y, k, None, batch, epochs, repeats, args.device, args.precision)
            row = {"model": kind, "hidden": hidden, "parameters": sum(p.numel() for p in build_model(kind, x.shape[1:], k, hidden).parameters()), "dataset": ds, "records": int(len(y)), "batch_size": batch, "non_private_samples_per_s": base, "modes": {}}
            for mode in ("ghost", "hooks", "functorch"):
                try:
                    if args.precision == "fp16":
                        raise ValueError("fp16 is not supported with DP-SGD (by design)")
                    sps = _throughput(kind, hidden, x, y, k, mode, batch, epochs, repeats, args.device, args.precision)
                    row["modes"][mode] = {"samples_per_s": sps, "slowdown": base / sps}
                except Exception as exc:  # noqa: BLE001 - a mode that fails is a result too
                    row["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            results.append(row)
            print(json.dumps(row))
    out = {
        "benchmark": "dp_overhead",
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "precision": args.precision,
        "machine": platform.machine(),
        "processor_count": __import__("os").cpu_count(),
        "epochs": epochs,
        "repeats_best_of": repeats,
        "goal": "private/non-private time <= 3x for the default mode (ghost)",
        "results": results,
    }
    suffix = "" if (args.device, args.precision) == ("cpu", "fp32") else f"_{args.device}_{args.precision}"
    dest = Path(__file__).resolve().parent / "results" / f"dp_overhead{suffix}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
