"""Sparsity benchmark (issue 5): an 80%-sparse global model within 1 point of dense accuracy.

Two federated tasks, each run dense and with the coordinator's global mask at target 0.8:
* breast cancer: 10 hospitals, Dirichlet alpha 1.0, MLP [64] (simulations/hospitals.yaml), 10 rounds,
  and again with 20 rounds (`breast_cancer_20r`: dense, progressive, fixed);
* digits: 20 sites, Dirichlet alpha 0.5, GroupNorm CNN (simulations/digits.yaml).
Sparsity configs: `progressive` (magnitude pruning of the global model, ramped to the target by
`end_fraction` 0.75 of the rounds, fedseek's default), `progressive_early` (the same ramp done by
half of the rounds, leaving more rounds to recover) and `fixed` (a data-independent mask drawn from
the seed before round 1). Non-DP by default (`--dp` adds DP-SGD runs at epsilon 8); the same seeds for every
config, several seeds to show the run-to-run noise (breast cancer's test set is 142 rows, so one
row is 0.7 points; hence 5 seeds there).

The sparsity achieved is read twice: as fedseek reports it (`summary.json` `sparsity`, share of
pruned entries in the masked tensors = weight matrices / conv kernels) and independently from
`model.pt` (share of exact zeros in tensors with dim > 1, and over all parameters).

Goal (issue 5): a 80%-sparse model within 1 point of dense accuracy on breast cancer and digits.
`goal_met` compares the mean final accuracy over seeds (sparse - dense >= -0.01) and requires the
final model to be >= 80% sparse; `per_task_nondp` counts breast cancer as met if either length meets it.

Non-DP runs are deterministic for a seed, so results are cached in $TMPDIR/fedseek-bench/cache keyed
by the validated scenario and a hash of the code (see benchmarks/_common.py); --no-cache re-runs all.

Run:  .venv/bin/python benchmarks/sparsity.py            (full; ~20 min on 2 cores, uncached)
      .venv/bin/python benchmarks/sparsity.py --quick    (smoke, ~1-2 min: breast cancer only, 1 seed, 2 rounds, 4 sites)
Writes benchmarks/results/sparsity.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_DIR, RESULTS, breast_cancer_scenario, digits_scenario, environment, fmt, log, run, table, write_json  # noqa: E402

TARGET = 0.8
VARIANTS: dict[str, dict] = {
    "dense": {"enabled": False},
    "progressive": {"enabled": True, "target": TARGET, "schedule": "progressive"},
    "fixed": {"enabled": True, "target": TARGET, "schedule": "fixed"},
    # the ramp done by half of the rounds (default 0.75): more rounds to recover at the final sparsity
    "progressive_early": {"enabled": True, "target": TARGET, "schedule": "progressive", "end_fraction": 0.5},
}
DATASETS = {
    "breast_cancer": {"make": breast_cancer_scenario, "seeds": [42, 43, 44, 45, 46], "over": {},
                      "dp_over": {"train": {"lr": 0.1}}},  # simulations/hospitals_dp.yaml's lr
    # the same with 20 rounds instead of 10 (dense and sparse alike): more rounds at the final sparsity
    "breast_cancer_20r": {"make": breast_cancer_scenario, "seeds": [42, 43, 44, 45, 46], "over": {"rounds": 20},
                          "dp_over": {"rounds": 20, "train": {"lr": 0.1}}, "variants": ["dense", "progressive", "fixed"]},
    # under DP: the recipe tuned in benchmarks/communication.py (its dense DP run is this one's baseline)
    "digits": {"make": digits_scenario, "seeds": [7, 8], "over": {},
               "dp_over": {"rounds": 30, "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 16, "momentum": 0.9}}},
}
PRIVACY = {"epsilon_budget": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp", "grad_sample_mode": "ghost"}
GOAL = "A 80%-sparse model within 1 point of dense accuracy on breast cancer and digits (issue 5)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: breast cancer only (unless --datasets), 1 seed, 2 rounds, 4 sites")
    ap.add_argument("--dp", action="store_true", help="also run every config under DP-SGD (epsilon 8)")
    ap.add_argument("--dp-seeds", type=int, default=1, help="with --dp: how many of each dataset's seeds run under DP (default 1)")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/sparsity.json (sparsity.quick.json in the temp dir with --quick)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-cache", action="store_true", help="re-run every config (default: reuse a result of the same scenario and code)")
    args = ap.parse_args()
    if args.out is None:
        args.out = QUICK_DIR / "sparsity.quick.json" if args.quick else RESULTS / "sparsity.json"

    if args.quick and args.datasets == ",".join(DATASETS):
        args.datasets = "breast_cancer"
    plan = []
    for ds in args.datasets.split(","):
        spec = DATASETS[ds]
        seeds = spec["seeds"][:1] if args.quick else spec["seeds"]
        for dp in ([False, True] if args.dp else [False]):
            for seed in (seeds[: args.dp_seeds] if dp else seeds):
                for var in spec.get("variants", VARIANTS):
                    plan.append((ds, dp, seed, var))

    tmp = tempfile.TemporaryDirectory(prefix="fedseek-bench-sparsity-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    scenarios, results = {}, {}
    t_all = time.time()
    for i, (ds, dp, seed, var) in enumerate(plan, 1):
        tag = f"{ds}-{'dp' if dp else 'nodp'}-{var}-s{seed}"
        over = dict(DATASETS[ds]["dp_over" if dp else "over"])
        if args.quick:
            over.update({"rounds": 2, "num_sites": 4, "strategy": {"min_sites": 4}})
        sc = DATASETS[ds]["make"](name=f"sparsity-{tag}", seed=seed, sparsity=VARIANTS[var], **over)
        if dp:
            sc["privacy"] = dict(PRIVACY)
        scenarios[tag] = sc
        log(f"[{i}/{len(plan)}] {tag} ...")
        r = run(sc, workdir, tag, cache=not args.no_cache)
        r.update({"dataset": ds, "dp": dp, "seed": seed, "variant": var})
        results[tag] = r
        log("    -> " + (r["error"] if "error" in r else
                         f"acc {r['final_accuracy']:.4f}  sparsity {fmt(r['sparsity_reported'], '.3f')}" + (" (cached)" if r.get("cached") else f"  {r['wall_seconds']:.0f}s")))

    for r in results.values():
        if "error" in r:
            continue
        ref = results.get(f"{r['dataset']}-{'dp' if r['dp'] else 'nodp'}-dense-s{r['seed']}")
        if ref and "error" not in ref:
            r["accuracy_delta_vs_dense"] = r["final_accuracy"] - ref["final_accuracy"]
            r["last3_delta_vs_dense"] = r["last3_mean_accuracy"] - ref["last3_mean_accuracy"]

    summary, goal_met = {}, {}
    for ds in args.datasets.split(","):
        for dp in ([False, True] if args.dp else [False]):
            key = f"{ds}-{'dp' if dp else 'nodp'}"
            summary[key] = {}
            for var in VARIANTS:
                rs = [r for r in results.values() if r["dataset"] == ds and r["dp"] == dp and r["variant"] == var and "error" not in r]
                if not rs:
                    continue
                s = {
                    "seeds": [r["seed"] for r in rs],
                    "final_accuracy_by_seed": [r["final_accuracy"] for r in rs],
                    "final_accuracy_mean": statistics.fmean(r["final_accuracy"] for r in rs),
                    "final_accuracy_std": statistics.stdev([r["final_accuracy"] for r in rs]) if len(rs) > 1 else None,
                    "last3_mean_accuracy_mean": statistics.fmean(r["last3_mean_accuracy"] for r in rs),
                    "sparsity_reported_min": min(r["sparsity_reported"] or 0.0 for r in rs),
                    "model_zero_fraction_weights_min": min((r["model_zero_fraction"] or {}).get("weights", 0.0) for r in rs),
                    "model_zero_fraction_all_min": min((r["model_zero_fraction"] or {}).get("all_params", 0.0) for r in rs),
                }
                deltas = [r["accuracy_delta_vs_dense"] for r in rs if "accuracy_delta_vs_dense" in r]
                if var != "dense" and deltas:
                    s["accuracy_delta_vs_dense_by_seed"] = deltas
                    s["accuracy_delta_vs_dense_mean"] = statistics.fmean(deltas)
                    s["last3_delta_vs_dense_mean"] = statistics.fmean(r["last3_delta_vs_dense"] for r in rs if "last3_delta_vs_dense" in r)
                    # per-tensor rounding of the pruned count: 1638 of 2048 MLP weights is 0.7998
                    s["sparse_enough"] = s["sparsity_reported_min"] >= TARGET - 1e-3 and s["model_zero_fraction_weights_min"] >= TARGET - 1e-3
                    s["within_1pt_mean"] = s["accuracy_delta_vs_dense_mean"] >= -0.01
                    s["within_1pt_every_seed"] = all(d >= -0.01 for d in deltas)
                    s["goal_met"] = s["sparse_enough"] and s["within_1pt_mean"]
                summary[key][var] = s
            met = {v: summary[key][v].get("goal_met", False) for v in VARIANTS if v != "dense" and v in summary[key]}
            goal_met[key] = {"any_schedule": any(met.values()), **met}
    dsl = args.datasets.split(",")
    goal_met["all_nondp"] = all(goal_met[f"{ds}-nodp"]["any_schedule"] for ds in dsl)
    # the goal names two tasks; breast cancer counts as met if either training length meets it
    tasks = {"breast_cancer": [d for d in dsl if d.startswith("breast_cancer")], "digits": [d for d in dsl if d == "digits"]}
    goal_met["per_task_nondp"] = {t: any(goal_met[f"{d}-nodp"]["any_schedule"] for d in ds_) for t, ds_ in tasks.items() if ds_}
    goal_met["both_tasks_nondp"] = all(goal_met["per_task_nondp"].values())

    notes = [
        "Breast cancer's test set has 142 rows: one row is 0.70 points, so per-seed deltas move in 0.7-point steps; the verdict uses the mean over 5 seeds.",
        "Under DP (not run here unless --dp): see benchmarks/results/communication.json mask80_int8 / prog80_int8. Before "
        "fedseek.privacy.masked_clipping, Opacus ghost clipping counted the pruned weights' gradients in every per-record norm and a fixed "
        "80% mask lost ~50 points at epsilon 8; clipping now counts the active weights only, in every grad_sample_mode.",
    ]
    report = {
        "benchmark": "sparsity",
        "notes": notes,
        "goal": GOAL,
        "goal_met": goal_met,
        "quick": args.quick,
        "setup": {
            "target": TARGET, "variants": VARIANTS,
            "progressive": "magnitude pruning of the global model after aggregation, Zhu & Gupta cubic ramp "
                           "(fedseek.sparsity.schedule_sparsity), target reached at end_fraction 0.75 of the rounds (default)",
            "fixed": "init_mask from the seed (data-independent), applied before round 1",
            "datasets": {ds: {"seeds": DATASETS[ds]["seeds"], "overrides": DATASETS[ds]["over"]} for ds in args.datasets.split(",")},
            "dp": args.dp, "privacy_if_dp": PRIVACY, "dp_seeds": args.dp_seeds if args.dp else None,
            "dp_overrides": {ds: DATASETS[ds]["dp_over"] for ds in args.datasets.split(",")} if args.dp else None,
            "accuracy": "central test accuracy of the final global model; goal on the mean over seeds (delta >= -0.01)",
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

    header = ["dataset", "DP", "variant", "seeds", "final acc (per seed)", "mean", "d vs dense", "sparsity", "zeros in model"]
    body = []
    for key, per in summary.items():
        ds, dpw = key.rsplit("-", 1)
        for var, s in per.items():
            body.append([ds, "yes" if dpw == "dp" else "no", var, ",".join(map(str, s["seeds"])),
                         " ".join(f"{a:.4f}" for a in s["final_accuracy_by_seed"]), f"{s['final_accuracy_mean']:.4f}",
                         f"{s['accuracy_delta_vs_dense_mean'] * 100:+.2f}" if "accuracy_delta_vs_dense_mean" in s else "",
                         f"{s['sparsity_reported_min']:.3f}", f"{s['model_zero_fraction_weights_min']:.3f}"])
    print(table(body, header))
    print(f"goal: {GOAL}")
    print(f"goal_met: {goal_met}")
    print(f"wrote {args.out}  ({time.time() - t_all:.0f}s)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
