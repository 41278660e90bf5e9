"""Smaller models for the sites (issue 19) on a larger CNN over an image folder, with the GPU paths of a site's training.

A site's local training path (`fedseek.train.local.train_local`, what every site runs in a round)
on one machine holding all the images: no federation here, so the figures isolate the model sizes,
the precisions and DP-SGD on the GPU. The images are written by this script as an image folder
(root/CLASS/*.png: scikit-learn's 8x8 digits upscaled to 32x32 RGB with random colours, shifts and
noise; nothing is downloaded) and read back with fedseek's own loader at 16x16 (the zoo's CNN pools
to 4x4 after two convolutions, so it learns these far better at 16 than at 32 pixels; its size does
not depend on the resolution).

Measured:
- training throughput (samples/s) of the teacher CNN (width 64) on the device: fp32, bf16 autocast,
  fp16 with GradScaler (non-DP), and DP-SGD (Opacus ghost clipping) in fp32 and bf16;
- teacher accuracy; a student CNN (width 16, <= 1/8 of the parameters) trained on the labels alone
  and by distillation (alpha 0.5, T 3), non-DP and under DP-SGD (epsilon reported);
- fp32 vs INT8 (static, synthetic calibration; `fedseek quantize`'s code, the INT8 module traced as
  `fedseek predict` / `serve` load it) for teacher and student: accuracy, saved bytes (fp32: model.pt as
  torch.save writes it, and the same weights in the INT8 file's packing), CPU latency at batch 1 and
  256 (this machine's CPU, torch's default threads).
The teacher trains in fp32 (batch 32, lr 0.02); the students at lr 0.05, the DP ones in bf16 autocast (batch 128).

Usage: python benchmarks/delivery_images.py [--device cuda] [--quick] [--out PATH]
Writes benchmarks/results/delivery_images.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedseek.config import PrivacySpec  # noqa: E402
from fedseek.data.loaders import load_image_folder  # noqa: E402
from fedseek.privacy import DPRound, PrivacyLedger  # noqa: E402
from fedseek.serving import int8_file  # noqa: E402
from fedseek.serving.measure import latency_ms, model_bytes  # noqa: E402
from fedseek.serving.quantize import quantize_module, traced  # noqa: E402
from fedseek.train.local import distill_targets, evaluate, teacher_logits, train_local  # noqa: E402
from fedseek.train.models import build_model  # noqa: E402

IMAGE_SIZE = 16


def write_images(root: Path, copies: int, seed: int = 0) -> None:
    """root/CLASS/*.png: each 8x8 digit `copies` times at 32x32 RGB, random colours, a shift and pixel noise."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for k in range(10):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        big = np.asarray(Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((24, 24), Image.Resampling.BILINEAR), np.float32) / 255
        for c in range(copies):
            fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
            canvas = np.zeros((32, 32, 3), np.float32) + bg
            dy, dx = rng.integers(0, 9, 2)
            canvas[dy : dy + 24, dx : dx + 24] = big[..., None] * fg + (1 - big[..., None]) * bg
            canvas = np.clip(canvas + rng.normal(0, 0.05, canvas.shape), 0, 1)
            Image.fromarray((canvas * 255).astype(np.uint8)).save(root / str(label) / f"{i}_{c}.png")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(model: Any, x: np.ndarray, y: np.ndarray, *, device: str, epochs: int, precision: str = "fp32", dp: bool = False,
          distill: tuple[float, float] | None = None, lr: float = 0.05, batch: int = 32, noise: float = 1.0) -> dict[str, Any]:
    """One site's local training; returns samples/s and (under DP) epsilon."""
    ledger = PrivacyLedger(Path(tempfile.mkdtemp(prefix="fedseek-ledger-")), accountant="rdp", delta=1e-5, epsilon_budget=1e6)
    privacy = DPRound(PrivacySpec(noise_multiplier=noise, grad_sample_mode="ghost"), ledger, noise, run_id="b",
                      server_round=1) if dp else None
    _sync(device)
    t0 = time.perf_counter()
    res = train_local(model, x, y, num_classes=10, epochs=epochs, lr=lr, batch_size=batch, momentum=0.9, device=device,
                      precision=precision, privacy=privacy, distill=distill, seed=0)
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"seconds": dt, "samples_per_s": len(y) * epochs / dt}
    if dp:
        out["epsilon"] = res.dp["epsilon"]
        out["delta"] = res.dp["delta"]
    model.cpu()
    return out


def cpu_row(name: str, model: Any, x: np.ndarray, y: np.ndarray, nbytes: int, params: int) -> dict[str, Any]:
    """Accuracy, bytes and CPU latency of one model."""
    acc = float(np.mean(model(torch.as_tensor(x)).argmax(1).numpy() == y)) if len(y) else float("nan")
    return {"model": name, "parameters": params, "bytes": nbytes, "accuracy": acc,
            "latency_ms_batch1": latency_ms(model, x, 1), "latency_ms_batch256": latency_ms(model, x, 256)}


def main() -> int:
    warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (see fedseek.serving.quantize)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one copy per digit, few epochs (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "delivery_images.json"))
    args = ap.parse_args()
    copies, epochs = (1, 2) if args.quick else (3, 20)
    root = Path(tempfile.mkdtemp(prefix="fedseek-images-")) / "digits32"
    t0 = time.perf_counter()
    write_images(root, copies)
    data = load_image_folder(root, IMAGE_SIZE, grayscale=False)
    perm = np.random.default_rng(0).permutation(len(data.y))
    cut = int(0.8 * len(perm))
    xtr, ytr, xte, yte = data.x[perm[:cut]], data.y[perm[:cut]], data.x[perm[cut:]], data.y[perm[cut:]]
    print(f"image folder: {len(data.y)} images {data.x.shape[1:]} in {time.perf_counter() - t0:.1f}s", flush=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
                           "machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
                           "images": {"train": int(len(ytr)), "test": int(len(yte)), "shape": list(data.x.shape[1:])},
                           "epochs": epochs, "batch_size": {"non-dp": 32, "dp": 128}, "lr": {"teacher": 0.02, "students": 0.05}, "momentum": 0.9,
                           "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": "ghost", "delta": 1e-5}}
    shape = tuple(int(d) for d in data.x.shape[1:])

    # throughput of the teacher's training paths on the device (batch 128; 2 epochs each, after a warm-up epoch)
    speed: dict[str, Any] = {}
    for label, precision, dp in (("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16+GradScaler", "fp16", False),
                                 ("dp-sgd fp32", "fp32", True), ("dp-sgd bf16", "bf16", True)):
        if precision == "fp16" and args.device != "cuda":
            continue
        m = build_model("cnn", shape, 10, width=64, seed=0)
        train(m, xtr, ytr, device=args.device, epochs=1, precision=precision, dp=dp, batch=128)
        speed[label] = train(m, xtr, ytr, device=args.device, epochs=2, precision=precision, dp=dp, batch=128)
        print(f"teacher {label}: {speed[label]['samples_per_s']:.0f} samples/s", flush=True)
    res["teacher_training_throughput"] = speed

    teacher = build_model("cnn", shape, 10, width=64, seed=0)
    res["teacher_training"] = train(teacher, xtr, ytr, device=args.device, epochs=epochs, lr=0.02)  # 0.05 diverges at width 64
    teacher.eval()
    t_acc = evaluate(teacher, xte, yte, 10)["accuracy"]
    logits = teacher_logits(teacher, xtr)
    packed = distill_targets(ytr, logits)
    students: dict[str, Any] = {}
    for label, y, distill, dp in (("labels only", ytr, None, False), ("distilled", packed, (0.5, 3.0), False),
                                  ("labels only, DP", ytr, None, True), ("distilled, DP", packed, (0.5, 3.0), True)):
        s = build_model("cnn", shape, 10, width=16, seed=1)
        info = train(s, xtr, y, device=args.device, epochs=epochs, precision="bf16" if dp else "fp32", dp=dp, distill=distill,
                     batch=128 if dp else 32)
        s.eval()
        info["accuracy"] = evaluate(s, xte, yte, 10)["accuracy"]
        students[label] = {"model": s, **info}
        print(f"student {label}: accuracy {info['accuracy']:.4f}" + (f", epsilon {info['epsilon']:.2f}" if dp else ""), flush=True)
    tp = int(sum(p.numel() for p in teacher.parameters()))
    sp = int(sum(p.numel() for p in students["distilled"]["model"].parameters()))
    res["teacher"] = {"model": "cnn width 64", "parameters": tp, "accuracy": t_acc}
    res["students"] = {k: {kk: vv for kk, vv in v.items() if kk != "model"} | {"parameters": sp} for k, v in students.items()}
    res["student_to_teacher_parameters"] = sp / tp
    res["distilled_to_teacher_accuracy"] = students["distilled"]["accuracy"] / t_acc

    # fp32 vs INT8 on this machine's CPU
    rows = []
    calib = np.random.default_rng(0).uniform(0, 1, (512, *shape)).astype(np.float32)  # synthetic: no record of anyone
    for name, m, params in (("teacher", teacher, tp), ("student (distilled)", students["distilled"]["model"], sp)):
        rows.append(cpu_row(f"{name} fp32", m, xte, yte, model_bytes(m), params))
        q, mode, nbytes = quantize_module(m, shape, calib)
        q = traced(q, shape)  # as fedseek predict / serve load it
        rows.append(cpu_row(f"{name} INT8 ({mode})", q, xte, yte, nbytes, params))
        rows[-2]["bytes_same_format"] = len(int8_file.dumps(m.state_dict()))  # fp32 weights in the INT8 file's packing
        f32, i8 = rows[-2], rows[-1]
        agree = float(np.mean(m(torch.as_tensor(xte)).argmax(1).numpy() == q(torch.as_tensor(xte)).argmax(1).numpy()))
        i8.update({"agreement_with_fp32": agree, "bytes_ratio": f32["bytes"] / i8["bytes"],
                   "speedup_batch256": f32["latency_ms_batch256"] / i8["latency_ms_batch256"]})
        print(f"{name}: fp32 {f32['accuracy']:.4f} {f32['bytes']:,} B -> INT8 {i8['accuracy']:.4f} {i8['bytes']:,} B "
              f"({i8['bytes_ratio']:.2f}x smaller), batch 256 {i8['speedup_batch256']:.2f}x faster, agreement {agree:.4f}", flush=True)
    res["int8"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
