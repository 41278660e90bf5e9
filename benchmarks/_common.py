"""Shared helpers for the scenario benchmarks (communication, sparsity, watermark_federated).

Every configuration is a real `fedseek simulate` run, in-process through
`fedseek.ops.simulate.simulate` (private SuperLink, `flwr run`, Flower's simulation engine): the
scenario is written as YAML into a temporary directory, run into a fresh output directory (so
every site starts with an empty privacy ledger), and its `summary.json` + `metrics.jsonl` are
reduced to the figures the benchmarks report.
"""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "fedseek-bench"  # --quick smoke results: never overwrite the real figures


def digits_scenario(**over: Any) -> dict[str, Any]:
    """20 sites on 8x8 digits, Dirichlet alpha 0.5, the GroupNorm CNN (simulations/digits.yaml)."""
    base = {
        "name": "bench-digits",
        "seed": 7,
        "num_sites": 20,
        "rounds": 15,
        "data": {"dataset": "digits"},
        "partition": {"scheme": "dirichlet", "alpha": 0.5},
        "model": {"kind": "cnn"},
        "strategy": {"name": "fedavg", "min_sites": 20},
        "train": {"local_epochs": 2, "lr": 0.05, "batch_size": 16, "momentum": 0.9},
        "round_timeout_s": 300,
    }
    return merge(base, over)


def breast_cancer_scenario(**over: Any) -> dict[str, Any]:
    """10 hospitals on breast cancer, Dirichlet alpha 1.0, MLP [64] (simulations/hospitals.yaml)."""
    base = {
        "name": "bench-breast-cancer",
        "seed": 42,
        "num_sites": 10,
        "rounds": 10,
        "data": {"dataset": "breast_cancer", "test_fraction": 0.25},
        "partition": {"scheme": "dirichlet", "alpha": 1.0},
        "model": {"kind": "mlp", "hidden": [64]},
        "strategy": {"name": "fedavg", "min_sites": 10},
        "train": {"local_epochs": 2, "lr": 0.05, "batch_size": 16},
        "round_timeout_s": 300,
    }
    return merge(base, over)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge `over` into a copy of `base` (a value of None removes the key)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _model_zero_fraction(out: Path) -> dict[str, float] | None:
    """Independent check of sparsity: share of exact zeros in model.pt (weight matrices/kernels, and all tensors)."""
    path = out / "model.pt"
    if not path.exists():
        return None
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    w_n = w_z = a_n = a_z = 0
    for t in sd.values():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        z = int((t == 0).sum())
        a_n += t.numel()
        a_z += z
        if t.dim() > 1:
            w_n += t.numel()
            w_z += z
    return {"weights": w_z / max(1, w_n), "all_params": a_z / max(1, a_n), "weight_params": w_n, "all_params_count": a_n}


CACHE_DIR = QUICK_DIR / "cache"
# The code that decides a simulation's numbers (not the CLI, deployment, report or process plumbing,
# which other work edits often): the cache key hashes these files.
RESULT_CODE = (
    "fedseek/codec.py", "fedseek/config.py", "fedseek/coordinator.py", "fedseek/models.py", "fedseek/protocol.py",
    "fedseek/site.py", "fedseek/watermark.py", "fedseek/aggregate", "fedseek/data", "fedseek/train",
    "server/app.py", "clients/app.py", "pyproject.toml",
)


def magnitude_prune(model: Any, frac: float) -> Any:
    """A copy of `model` with global magnitude pruning of all weight matrices / conv kernels (biases, norms untouched):
    the pruning attack of issue 6, shared by benchmarks/watermark.py and benchmarks/watermark_federated.py."""
    import torch

    m = copy.deepcopy(model)
    ws = [p for p in m.parameters() if p.dim() > 1]
    thr = torch.quantile(torch.cat([p.detach().abs().flatten() for p in ws]), frac)
    with torch.no_grad():
        for p in ws:
            p.mul_((p.abs() > thr).to(p.dtype))
    return m


def code_hash() -> str:
    """SHA-256 over the code that decides a run's figures (RESULT_CODE) and the torch / flwr / opacus
    versions: part of the cache key, so an edit there invalidates cached runs. Computed afresh on every
    call (the simulation's processes import the code as it is on disk then)."""
    import hashlib
    from importlib import metadata

    h = hashlib.sha256()
    files: list[Path] = []
    for rel in RESULT_CODE:
        p = ROOT / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    for dist in ("torch", "flwr", "opacus"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()


def _cache_key(scenario: dict[str, Any], code: str) -> str:
    """The validated scenario (defaults filled in, `name` dropped: it only labels the run) + code hash."""
    import hashlib

    from fedseek.config import ScenarioConfig

    cfg = ScenarioConfig.model_validate(scenario).model_dump(mode="json")
    cfg.pop("name", None)
    wm = cfg.get("watermark") or {}
    if wm.get("key_file"):  # the key's content matters, not where it lies
        wm["key_file"] = hashlib.sha256(Path(wm["key_file"]).read_bytes()).hexdigest()
    return hashlib.sha256((json.dumps(cfg, sort_keys=True) + code).encode()).hexdigest()


def run(scenario: dict[str, Any], workdir: Path, tag: str, *, keep_rounds: bool = False, cache: bool = True) -> dict[str, Any]:
    """Run one scenario (fresh out dir, fresh ledgers) and reduce its outputs to the benchmark's figures.

    With `cache`, a result for the same validated scenario and the same code (see `code_hash`) is reused
    from QUICK_DIR/cache; the result then says `"cached": true` and when it was measured. Non-DP runs
    are deterministic for a seed (a re-run reproduces every figure except timings); DP runs are not
    (sites draw the DP noise from the OS CSPRNG), so a cached DP result is one sample, as a fresh one is.
    """
    code = code_hash()
    cpath = CACHE_DIR / f"{_cache_key(scenario, code)}.json" if cache else None
    if cpath is not None and cpath.exists():
        res = json.loads(cpath.read_text())
        res.update({"tag": tag, "cached": True})
        return res
    res = _run(scenario, workdir, tag, keep_rounds=keep_rounds)
    same_code = code_hash() == code  # nobody edited the code while it ran
    res.update({"cached": False, "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_sha256": code if same_code else None})
    if cpath is not None and same_code and "error" not in res:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cpath.write_text(json.dumps(res, default=float))
    return res


def _run(scenario: dict[str, Any], workdir: Path, tag: str, *, keep_rounds: bool = False) -> dict[str, Any]:
    from rich.console import Console

    from fedseek.ops.simulate import simulate

    workdir.mkdir(parents=True, exist_ok=True)
    spath = workdir / f"{tag}.yaml"
    spath.write_text(yaml.safe_dump(scenario, sort_keys=False))
    out = workdir / f"out-{tag}"
    buf = io.StringIO()
    t0 = time.time()
    try:
        summary = simulate(spath, out, console=Console(file=buf, width=120, force_terminal=False))
    except Exception as exc:  # noqa: BLE001 - a failed configuration is reported, not fatal to the benchmark
        return {"tag": tag, "error": f"{type(exc).__name__}: {exc}"[:2000], "wall_seconds": time.time() - t0}
    wall = time.time() - t0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accs = [r["central"].get("accuracy") for r in rounds if r.get("central")]
    n_rounds = max(1, len(rounds))
    priv = summary.get("privacy") or {}
    wm = summary.get("watermark")
    res: dict[str, Any] = {
        "tag": tag,
        "final_accuracy": summary["final"].get("accuracy"),
        "final_loss": summary["final"].get("loss"),
        "final_auc": summary["final"].get("auc"),
        "best_accuracy": max(accs) if accs else None,
        "last3_mean_accuracy": sum(accs[-3:]) / len(accs[-3:]) if accs else None,
        "accuracy_by_round": [round(a, 4) for a in accs],
        "rounds_completed": summary.get("rounds_completed"),
        "bytes_up": summary["bytes_up"],
        "wire_bytes_up": summary["wire_bytes_up"],
        "dense_bytes_up": summary["dense_bytes_up"],
        "bytes_down": summary["bytes_down"],
        "bytes_up_per_round_mean": summary["bytes_up"] / n_rounds,
        "wire_bytes_up_per_round_mean": summary["wire_bytes_up"] / n_rounds,
        "bytes_up_per_site_round_mean": summary["bytes_up"] / max(1, sum(r.get("accepted", 0) for r in rounds)),
        "compression": summary.get("compression"),
        "sparsity_reported": summary.get("sparsity"),
        "model_zero_fraction": _model_zero_fraction(out),
        "max_epsilon": priv.get("max_epsilon"),
        "noise_multipliers": sorted({round(s["noise_multiplier"], 4) for s in (priv.get("sites") or {}).values()
                                     if s.get("noise_multiplier") is not None}) or None,
        "rejected_updates": summary.get("rejected_updates"),
        "refused_rounds": summary.get("refused_rounds"),
        "failed_replies": summary.get("failed_replies"),
        "run_wall_seconds": summary.get("wall_seconds"),
        "wall_seconds": wall,
    }
    if wm is not None:
        wm_rows = [r["watermark"] for r in rounds if r.get("watermark")]
        res["watermark"] = {
            "p_value": wm.get("p_value"), "matches": wm.get("matches"), "n": wm.get("n"), "num_classes": wm.get("num_classes"),
            "detected": wm.get("detected"), "alpha": wm.get("alpha"), "embed_seconds_total": wm.get("embed_seconds"),
            "embed_steps_total": sum(int(r.get("steps", 0)) for r in wm_rows),
            "embed_seconds_per_round_mean": (wm.get("embed_seconds") or 0.0) / max(1, len(wm_rows)),
            "trigger_accuracy_before_by_round": [round(float(r.get("trigger_accuracy_before", float("nan"))), 3) for r in wm_rows],
        }
    if keep_rounds:
        res["metrics_rows"] = rounds
    return res


def environment() -> dict[str, Any]:
    """Where the figures were measured."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "fedseek"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    try:
        import flwr

        flwr_v = flwr.__version__
    except Exception:  # noqa: BLE001
        flwr_v = None
    try:
        import opacus

        opacus_v = opacus.__version__
    except Exception:  # noqa: BLE001
        opacus_v = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "flwr": flwr_v,
        "opacus": opacus_v,
        "git_commit": commit,
        "fedseek_worktree_dirty": dirty,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and spec:
        return format(v, spec)
    if isinstance(v, int) and spec == ",":
        return format(v, ",")
    return str(v)


def table(rows: Iterable[Iterable[str]], header: list[str]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
