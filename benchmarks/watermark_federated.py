"""Watermark cost in real federated runs (issue 6): accuracy with vs without the coordinator's watermark.

`benchmarks/watermark.py` measures detection and attacks on a centrally trained stand-in; this one
runs the real thing: `fedseek simulate` with `watermark: {enabled: true}`, so the coordinator
re-embeds the trigger set after every aggregation, and the identical scenario (same seed: same
partitions, initial model, site sampling) without it.
* digits: 20 sites, Dirichlet alpha 0.5, GroupNorm CNN (simulations/digits.yaml), K = 10, 100 triggers;
* breast cancer: 10 hospitals, Dirichlet alpha 1.0, MLP [64] (simulations/hospitals.yaml), K = 2, 200 triggers.
Keys are reproducible benchmark keys (seed = SHA-256 of a label; deployments use `fedseek
watermark keygen`, the OS CSPRNG), written with `fedseek.watermark.save_key` and passed as
`watermark.key_file`; the trigger count is fedseek's default for K.

Watermark settings ("variants"): fedseek's default (target trigger accuracy 0.98, default trigger
count; the goal is checked on it), `target90` (stop embedding at 90% trigger accuracy) and
`half_triggers` (half the triggers); each compared with the same run without a watermark.

Reported: final accuracy with/without and the cost (without - with, in points) per seed and mean,
final verification of the global model (matches / n, exact binomial p-value, detected at
alpha 1e-6), and the coordinator's embedding time (total and per round).

Goals (issue 6): accuracy cost <= 0.5 points versus the same run without watermark (checked on the
mean over seeds, and reported per seed); watermarked final model p <= 1e-6. `goal_met` has one entry
per dataset/variant, `all_default` (fedseek's defaults) and `all_with_best_variant`.

Non-DP runs are deterministic for a seed, so results are cached in $TMPDIR/fedseek-bench/cache keyed
by the validated scenario and a hash of the code (see benchmarks/_common.py); --no-cache re-runs all.

Run:  .venv/bin/python benchmarks/watermark_federated.py            (full; ~15 min on 2 cores, uncached)
      .venv/bin/python benchmarks/watermark_federated.py --quick    (smoke, ~1-2 min: breast cancer only, 1 seed, 2 rounds, 4 sites)
Writes benchmarks/results/watermark_federated.json (or --out).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_DIR, RESULTS, breast_cancer_scenario, digits_scenario, environment, log, run, table, write_json  # noqa: E402

DATASETS = {
    "digits": {"make": digits_scenario, "seeds": [7, 8, 9], "input_shape": (1, 8, 8), "num_classes": 10},
    "breast_cancer": {"make": breast_cancer_scenario, "seeds": [42, 43, 44], "input_shape": (30,), "num_classes": 2},
}
# watermark settings compared with the run without; "default" is fedseek's default (the goal is checked on it)
VARIANTS: dict[str, dict] = {
    "default": {},
    # stop embedding at 90% trigger accuracy (90/100 matches at K=10: p ~ 1e-80; 180/200 at K=2: p ~ 1e-31)
    "target90": {"target_trigger_accuracy": 0.9},
    # half the default triggers (50 at K=10: p <= 1e-45 at 98%; 100 at K=2: p ~ 1e-28)
    "half_triggers": {"n_triggers_factor": 0.5},
}
GOAL = "Accuracy cost <= 0.5 points versus the same run without watermark; watermarked final model p <= 1e-6 (issue 6)"
MAX_COST = 0.005
ALPHA = 1e-6


def bench_key(ds: str, seed: int, workdir: Path, factor: float = 1.0) -> Path:
    """A reproducible key for (dataset, seed), saved 0600 where the scenario can name it."""
    from fedseek import watermark as wm

    spec = DATASETS[ds]
    n = int(round(wm.default_n_triggers(spec["num_classes"]) * factor))
    path = workdir / f"wm-{ds}-s{seed}-n{n}.key"
    if not path.exists():
        key = wm.WatermarkKey(hashlib.sha256(f"fedseek-bench-wmfed-{ds}-{seed}".encode()).hexdigest(),
                              n, spec["num_classes"], spec["input_shape"], model_id=f"bench-{ds}")
        wm.save_key(key, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: breast cancer only (unless --datasets), 1 seed, 2 rounds, 4 sites")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="watermark settings to compare (default first: the goal is checked on it)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/watermark_federated.json (watermark_federated.quick.json in the temp dir with --quick)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-cache", action="store_true", help="re-run every config (default: reuse a result of the same scenario and code)")
    args = ap.parse_args()
    if args.out is None:
        args.out = QUICK_DIR / "watermark_federated.quick.json" if args.quick else RESULTS / "watermark_federated.json"

    tmp = tempfile.TemporaryDirectory(prefix="fedseek-bench-wmfed-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if args.quick and args.datasets == ",".join(DATASETS):
        args.datasets = "breast_cancer"
    dsets = args.datasets.split(",")
    variants = ["default"] if args.quick else [v for v in args.variants.split(",") if v]
    plan = [(ds, seed, v) for ds in dsets for seed in (DATASETS[ds]["seeds"][:1] if args.quick else DATASETS[ds]["seeds"])
            for v in [None, *variants]]
    scenarios, results = {}, {}
    t_all = time.time()
    for i, (ds, seed, var) in enumerate(plan, 1):
        on = var is not None
        tag = f"{ds}-{'wm-' + var if on else 'nowm'}-s{seed}"
        over: dict = {"rounds": 2, "num_sites": 4, "strategy": {"min_sites": 4}} if args.quick else {}
        if on:
            vs = dict(VARIANTS[var])
            key = bench_key(ds, seed, workdir, vs.pop("n_triggers_factor", 1.0))
            over["watermark"] = {"enabled": True, "key_file": str(key), "alpha": ALPHA, **vs}
        sc = DATASETS[ds]["make"](name=f"wmfed-{tag}", seed=seed, **over)
        scenarios[tag] = sc
        log(f"[{i}/{len(plan)}] {tag} ...")
        r = run(sc, workdir, tag, cache=not args.no_cache)
        r.update({"dataset": ds, "seed": seed, "watermark_enabled": on, "variant": var})
        results[tag] = r
        log("    -> " + (r["error"] if "error" in r else
                         f"acc {r['final_accuracy']:.4f}" + (f"  p {r['watermark']['p_value']:.2e}  embed {r['watermark']['embed_seconds_total']:.1f}s" if on else "")
                         + (" (cached)" if r.get("cached") else f"  {r['wall_seconds']:.0f}s")))

    summary, goal_met = {}, {}
    for ds in dsets:
        for var in variants:
            key_ = f"{ds}/{var}"
            pairs = []
            for seed in (DATASETS[ds]["seeds"][:1] if args.quick else DATASETS[ds]["seeds"]):
                off, on = results.get(f"{ds}-nowm-s{seed}"), results.get(f"{ds}-wm-{var}-s{seed}")
                if not off or not on or "error" in off or "error" in on:
                    continue
                cost = off["final_accuracy"] - on["final_accuracy"]
                on["accuracy_cost_vs_no_watermark"] = cost
                on["last3_cost_vs_no_watermark"] = off["last3_mean_accuracy"] - on["last3_mean_accuracy"]
                pairs.append({"seed": seed, "accuracy_without": off["final_accuracy"], "accuracy_with": on["final_accuracy"], "cost": cost,
                              "last3_cost": on["last3_cost_vs_no_watermark"],
                              "p_value": on["watermark"]["p_value"], "matches": on["watermark"]["matches"], "n": on["watermark"]["n"],
                              "detected": on["watermark"]["detected"], "embed_seconds_total": on["watermark"]["embed_seconds_total"],
                              "embed_seconds_per_round_mean": on["watermark"]["embed_seconds_per_round_mean"],
                              "embed_steps_total": on["watermark"]["embed_steps_total"],
                              "run_wall_seconds_without": off["run_wall_seconds"], "run_wall_seconds_with": on["run_wall_seconds"]})
            if not pairs:
                goal_met[key_] = {"cost_le_0.5pt_mean": False, "cost_le_0.5pt_every_seed": False, "p_le_1e-6_every_seed": False}
                continue
            s_ = {
                "watermark_settings": VARIANTS[var],
                "pairs": pairs,
                "accuracy_without_mean": statistics.fmean(p["accuracy_without"] for p in pairs),
                "accuracy_with_mean": statistics.fmean(p["accuracy_with"] for p in pairs),
                "cost_mean": statistics.fmean(p["cost"] for p in pairs),
                "cost_max": max(p["cost"] for p in pairs),
                "last3_cost_mean": statistics.fmean(p["last3_cost"] for p in pairs),
                "p_value_max": max(p["p_value"] for p in pairs),
                "embed_seconds_per_round_mean": statistics.fmean(p["embed_seconds_per_round_mean"] for p in pairs),
            }
            summary[key_] = s_
            goal_met[key_] = {"cost_le_0.5pt_mean": s_["cost_mean"] <= MAX_COST,
                              "cost_le_0.5pt_every_seed": s_["cost_max"] <= MAX_COST,
                              "p_le_1e-6_every_seed": s_["p_value_max"] <= ALPHA}
    ok = lambda g: g["cost_le_0.5pt_mean"] and g["p_le_1e-6_every_seed"]  # noqa: E731
    goal_met["all_default"] = all(ok(g) for k, g in goal_met.items() if k.endswith("/default"))
    goal_met["all_with_best_variant"] = all(any(ok(goal_met[f"{ds}/{v}"]) for v in variants if f"{ds}/{v}" in goal_met) for ds in dsets)

    notes = [
        "The cost is persistent, not a last-embedding artefact: compare last3_cost_mean with cost_mean; after aggregation the trigger "
        "accuracy is already ~0.95-1.0 (results.*.watermark.trigger_accuracy_before_by_round), so target90 barely changes the embedding.",
        "benchmarks/watermark.py (a centrally trained stand-in with Adam) measured a 0.28-point per-round cost on digits; the federated "
        "run (FedAvg, SGD+momentum, Dirichlet 0.5) pays more.",
    ]
    report = {
        "benchmark": "watermark_federated",
        "notes": notes,
        "goal": GOAL,
        "goal_met": goal_met,
        "quick": args.quick,
        "setup": {
            "datasets": {ds: {k: v for k, v in DATASETS[ds].items() if k != "make"} for ds in dsets},
            "watermark": {"enabled": True, "alpha": ALPHA, "target_trigger_accuracy": "fedseek default (0.98) unless the variant says",
                          "max_steps": "fedseek default (200)", "embedded": "after every aggregation",
                          "triggers": "fedseek default for K (100 at K=10, 200 at K=2); half_triggers: half of it"},
            "variants": VARIANTS,
            "cost": "final accuracy without - with (positive = the watermark cost accuracy); goal on the mean over seeds",
            "privacy": "none (non-DP runs; the watermark uses no site data either way)",
        },
        "summary": summary,
        "scenarios": scenarios,
        "results": results,
        "total_wall_seconds": time.time() - t_all,  # this invocation (cached runs cost ~0 s)
        "runs_wall_seconds_sum": sum(r.get("wall_seconds", 0.0) for r in results.values()),  # as measured, cached or not
        "runs_cached": sum(1 for r in results.values() if r.get("cached")),
        "environment": environment(),
    }
    write_json(args.out, report)

    header = ["dataset/variant", "seed", "acc without", "acc with", "cost (pt)", "matches", "p-value", "embed s (total)", "embed s/round"]
    body = []
    for ds, s in summary.items():
        for p in s["pairs"]:
            body.append([ds, str(p["seed"]), f"{p['accuracy_without']:.4f}", f"{p['accuracy_with']:.4f}", f"{p['cost'] * 100:+.2f}",
                         f"{p['matches']}/{p['n']}", f"{p['p_value']:.1e}", f"{p['embed_seconds_total']:.1f}", f"{p['embed_seconds_per_round_mean']:.2f}"])
        body.append([ds, "mean", f"{s['accuracy_without_mean']:.4f}", f"{s['accuracy_with_mean']:.4f}", f"{s['cost_mean'] * 100:+.2f}", "",
                     f"max {s['p_value_max']:.1e}", "", f"{s['embed_seconds_per_round_mean']:.2f}"])
    print(table(body, header))
    print(f"goal: {GOAL}")
    print(f"goal_met: {goal_met}")
    print(f"wrote {args.out}  ({time.time() - t_all:.0f}s)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
