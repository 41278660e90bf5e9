"""Communication benchmark (issue 5): bytes up per round and final accuracy, dense fp32 vs each update codec.

Task: 8x8 digits, 20 simulated sites, Dirichlet label skew alpha 0.5, the GroupNorm CNN, FedAvg,
every site sampled every round. Every DP configuration runs at the SAME privacy budget: record-level
DP-SGD at each site (Opacus, RDP accountant, epsilon_budget 8, delta 1e-5, clip 1.0) with the noise
calibrated by each site's ledger so the announced rounds exactly fit the budget (noise_multiplier
left unset), so every config spends the same epsilon; same seed (same partitions, initial model,
sampling) for all. The codec runs after DP-SGD (post-processing: no privacy cost).

Configs: dense fp32 (codec none), fp16, int8 (stochastic rounding), top-k 10% + int8 (error
feedback), top-k 1% + int8 (the "100x point"), top-k 20% + int8 with a bitmap index (~12x), and 80%-sparse models
(global mask fixed from the seed, or pruned progressively by magnitude of the DP global model; DP-SGD
gradients, clipping norms and noise on the kept weights only) sent with the `sparse_mask` codec + int8
(kept values only, no indices); plus a non-DP reference pair (dense vs top-k 10% + int8). Diagnostics
on request (--configs): top-k 10% fp32, top-k 25% bitmap, top-k without error feedback, a 90% mask,
the fixed mask with Opacus hooks. Some configs re-run with a second seed (--repeat) to show how much final accuracy moves
between seeds. Sites draw DP noise from the OS CSPRNG, so DP runs are not reproducible even for a
seed: the dense DP run itself moves by a few points between runs.

Reported per config: bytes up per round (mean over rounds, all sites) and in total (exact codec
payload bytes, `bytes_up`) and on the wire (`wire_bytes_up`, payload + record framing), ratio vs
dense (`dense_bytes_up / bytes_up` as fedseek reports it, and the dense run's wire bytes / this
run's wire bytes), final accuracy (and the mean of the last 3 rounds, less sensitive to the
round-to-round wobble of DP training), accuracy delta vs dense, max epsilon over sites.

Goal (issue 5): >= 10x fewer bytes up than dense fp32 within 1 point of its accuracy at the same
epsilon; report the 100x point too.

Results are cached in $TMPDIR/fedseek-bench/cache keyed by the validated scenario and a hash of the
code that decides the figures (benchmarks/_common.py RESULT_CODE, library versions); a cached result
says "cached": true (for DP runs it is one sample, as a fresh run is). --no-cache re-runs everything.

Run:  .venv/bin/python benchmarks/communication.py            (full; ~25 min on 2 cores, uncached)
      .venv/bin/python benchmarks/communication.py --quick    (smoke, ~2 min: 4 sites, 2 rounds, 3 DP configs)
Writes benchmarks/results/communication.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_DIR, RESULTS, digits_scenario, environment, fmt, log, run, table, write_json  # noqa: E402

EPSILON = 8.0
DELTA = 1e-5
PRIVACY = {"epsilon_budget": EPSILON, "delta": DELTA, "max_grad_norm": 1.0, "accountant": "rdp", "grad_sample_mode": "ghost"}
# Local recipe: seven dense DP runs (see TUNING / "tuning" in the JSON) all plateaued at 0.82-0.84 at
# epsilon 8 (~67 training records per site), single runs within the DP noise of each other; 30 rounds x
# 1 epoch. lr 0.15 (was 0.05): with clipping restricted to the mask (fedseek.privacy.masked_clipping) an
# 80%-sparse model trains well under DP only at a larger step (seed 7, fixed mask: lr 0.05 -> 0.67,
# lr 0.15 -> 0.80, lr 0.25 -> 0.70), and dense fp32 did not lose by it (seeds 7, 8: lr 0.05 -> 0.81,
# 0.85; lr 0.15 -> 0.85, 0.87; measured with fedseek's site training in one process, not in this file).
ROUNDS = 30
TRAIN = {"local_epochs": 1, "lr": 0.15, "batch_size": 16, "momentum": 0.9}
SEED = 7

# name -> scenario keys (compression, and sparsity for the sparse_mask configs)
CODECS: dict[str, dict] = {
    "dense_fp32": {"compression": {"codec": "none"}},
    "fp16": {"compression": {"codec": "fp16"}},
    "int8": {"compression": {"codec": "int8"}},
    "topk10_int8": {"compression": {"codec": "topk", "topk_fraction": 0.1, "quantize": "int8", "error_feedback": True}},
    "topk1_int8": {"compression": {"codec": "topk", "topk_fraction": 0.01, "quantize": "int8", "error_feedback": True}},
    # denser top-k with a bitmap index (ceil(n/8) bytes per tensor: cheaper than delta varints above ~12% density)
    "topk20_int8_bitmap": {"compression": {"codec": "topk", "topk_fraction": 0.2, "quantize": "int8", "error_feedback": True, "index_coding": "bitmap"}},
    # a sparse model (global mask fixed from the seed: gradients, clipping norms AND DP noise on the kept
    # weights only) whose updates are sent as the masked-in values only (no indices: both sides hold the mask), int8
    "mask80_int8": {"compression": {"codec": "sparse_mask", "quantize": "int8"}, "sparsity": {"enabled": True, "target": 0.8, "schedule": "fixed"}},
    # the same, the mask pruned by magnitude from the DP global model, reaching 80% by 30% of the rounds
    "prog80_int8": {"compression": {"codec": "sparse_mask", "quantize": "int8"},
                    "sparsity": {"enabled": True, "target": 0.8, "schedule": "progressive", "end_fraction": 0.3}},
}
# diagnostics, run only when named with --configs (all lost >= 20 points under DP in a first pass)
EXTRA_CODECS: dict[str, dict] = {
    "topk10_fp32": {"compression": {"codec": "topk", "topk_fraction": 0.1, "quantize": "none", "error_feedback": True}},
    "topk25_int8_bitmap": {"compression": {"codec": "topk", "topk_fraction": 0.25, "quantize": "int8", "error_feedback": True, "index_coding": "bitmap"}},
    # Opacus hooks instead of ghost clipping (real per-sample gradients, masked before clipping): same guarantee
    "mask80_int8_hooks": {"compression": {"codec": "sparse_mask", "quantize": "int8"}, "sparsity": {"enabled": True, "target": 0.8, "schedule": "fixed"},
                          "privacy": {"grad_sample_mode": "hooks"}},
    # without error feedback: what top-k drops never arrives (much worse than with EF)
    "topk10_int8_noef": {"compression": {"codec": "topk", "topk_fraction": 0.1, "quantize": "int8", "error_feedback": False}},
    "topk1_int8_noef": {"compression": {"codec": "topk", "topk_fraction": 0.01, "quantize": "int8", "error_feedback": False}},
    "mask90_int8": {"compression": {"codec": "sparse_mask", "quantize": "int8"}, "sparsity": {"enabled": True, "target": 0.9, "schedule": "fixed"}},
}
NON_DP = ("dense_fp32", "topk10_int8")
GOAL = (">= 10x fewer bytes up than dense fp32 within 1 point of its accuracy at the same epsilon; "
        "report the 100x point too (issue 5)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 sites, 2 rounds, 3 DP configs, no non-DP pair")
    ap.add_argument("--seeds", default=",".join(str(SEED + i) for i in range(4)), help="comma-separated seeds; every DP config runs with the first")
    ap.add_argument("--repeat", default="dense_fp32,topk10_int8,topk20_int8_bitmap",
                    help="DP configs re-run with the further seeds (noise estimate)")
    ap.add_argument("--no-nondp", action="store_true", help="skip the non-DP reference pair")
    ap.add_argument("--configs", default=None, help=f"comma-separated DP configs (default: all of {', '.join(CODECS)}; "
                                                    f"diagnostics: {', '.join(EXTRA_CODECS)})")
    ap.add_argument("--no-cache", action="store_true", help="re-run every config (default: reuse a result of the same scenario and code)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/communication.json (communication.quick.json in the temp dir with --quick)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenario files and run outputs here (default: a temp dir)")
    args = ap.parse_args()
    if args.out is None:
        args.out = QUICK_DIR / "communication.quick.json" if args.quick else RESULTS / "communication.json"

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    over: dict = {"rounds": ROUNDS, "train": TRAIN}
    allc = {**CODECS, **EXTRA_CODECS}
    codecs = {k: allc[k] for k in (args.configs.split(",") if args.configs else CODECS)}
    if "dense_fp32" not in codecs:
        codecs = {"dense_fp32": CODECS["dense_fp32"], **codecs}
    if args.quick:
        over = {"rounds": 2, "num_sites": 4, "strategy": {"min_sites": 4}, "train": TRAIN}
        codecs = {k: CODECS[k] for k in ("dense_fp32", "topk10_int8", "topk1_int8")}
        seeds = seeds[:1]
    plan: list[tuple[str, bool, int]] = [(name, True, seeds[0]) for name in codecs]
    plan += [(name, True, s) for s in seeds[1:] for name in args.repeat.split(",") if name in codecs]
    if not (args.quick or args.no_nondp):
        plan += [(name, False, seeds[0]) for name in NON_DP if name in codecs]

    tmp = tempfile.TemporaryDirectory(prefix="fedseek-bench-comm-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    scenarios: dict[str, dict] = {}
    results: dict[str, dict] = {}
    t_all = time.time()
    for i, (name, dp, seed) in enumerate(plan, 1):
        tag = f"{'dp' if dp else 'nodp'}-{name}-s{seed}"
        sc = digits_scenario(name=f"comm-{tag}", seed=seed, **{k: v for k, v in codecs[name].items() if k != "privacy"}, **over)
        if dp:
            sc["privacy"] = {**PRIVACY, **codecs[name].get("privacy", {})}
        scenarios[tag] = sc
        log(f"[{i}/{len(plan)}] {tag} ...")
        r = run(sc, workdir, tag, cache=not args.no_cache)
        r.update({"config": name, "dp": dp, "seed": seed})
        results[tag] = r
        log("    -> " + (r["error"] if "error" in r else
                          f"acc {r['final_accuracy']:.4f}  bytes_up {r['bytes_up']:,}  eps {fmt(r['max_epsilon'], '.3f')}" + (" (cached)" if r.get("cached") else f"  {r['wall_seconds']:.0f}s")))

    # ---- compare with dense fp32 of the same privacy setting and seed
    for r in results.values():
        if "error" in r:
            continue
        ref = results.get(f"{'dp' if r['dp'] else 'nodp'}-dense_fp32-s{r['seed']}")
        if ref is None or "error" in ref:
            continue
        r["ratio_vs_dense"] = r["dense_bytes_up"] / r["bytes_up"] if r["bytes_up"] else None
        r["ratio_vs_dense_run_bytes"] = ref["bytes_up"] / r["bytes_up"] if r["bytes_up"] else None
        r["ratio_vs_dense_wire"] = ref["wire_bytes_up"] / r["wire_bytes_up"] if r["wire_bytes_up"] else None
        r["accuracy_delta_vs_dense"] = r["final_accuracy"] - ref["final_accuracy"]
        r["last3_delta_vs_dense"] = r["last3_mean_accuracy"] - ref["last3_mean_accuracy"]
        r["within_1pt_of_dense"] = r["accuracy_delta_vs_dense"] >= -0.01
        r["same_epsilon_as_dense"] = (not r["dp"]) or (r["max_epsilon"] is not None and ref["max_epsilon"] is not None
                                                       and abs(r["max_epsilon"] - ref["max_epsilon"]) <= 0.01 * EPSILON
                                                       and r["max_epsilon"] <= EPSILON)

    # ---- per-config means over seeds (DP)
    by_config: dict[str, dict] = {}
    for name in codecs:
        rs = [r for r in results.values() if r.get("dp") and r["config"] == name and "error" not in r and "accuracy_delta_vs_dense" in r]
        if not rs:
            continue
        by_config[name] = {
            "seeds": [r["seed"] for r in rs],
            "final_accuracy_by_seed": [r["final_accuracy"] for r in rs],
            "final_accuracy_mean": statistics.fmean(r["final_accuracy"] for r in rs),
            "final_accuracy_std": statistics.stdev([r["final_accuracy"] for r in rs]) if len(rs) > 1 else None,
            "last3_mean_accuracy_mean": statistics.fmean(r["last3_mean_accuracy"] for r in rs),
            "accuracy_delta_vs_dense_mean": statistics.fmean(r["accuracy_delta_vs_dense"] for r in rs),
            "last3_delta_vs_dense_mean": statistics.fmean(r["last3_delta_vs_dense"] for r in rs),
            "ratio_vs_dense": statistics.fmean(r["ratio_vs_dense"] for r in rs),
            "ratio_vs_dense_run_bytes": statistics.fmean(r["ratio_vs_dense_run_bytes"] for r in rs),
            "ratio_vs_dense_wire": statistics.fmean(r["ratio_vs_dense_wire"] for r in rs),
        }

    dense_c = by_config.get("dense_fp32")
    for name, c in by_config.items():
        if name != "dense_fp32" and dense_c and c["final_accuracy_std"] is not None and dense_c["final_accuracy_std"] is not None:
            # standard error of (mean of this config - mean of dense): DP noise makes single runs move by points
            c["delta_vs_dense_se"] = (c["final_accuracy_std"] ** 2 / len(c["seeds"]) + dense_c["final_accuracy_std"] ** 2 / len(dense_c["seeds"])) ** 0.5

    # ---- goals (DP runs, first seed; mean over seeds where repeated)
    dp_first = {r["config"]: r for r in results.values() if r.get("dp") and r["seed"] == seeds[0] and "ratio_vs_dense" in r}
    qualifying = [n for n, r in dp_first.items() if n != "dense_fp32" and r["ratio_vs_dense_run_bytes"] >= 10 and r["within_1pt_of_dense"] and r["same_epsilon_as_dense"]]
    qualifying_wire = [n for n in qualifying if dp_first[n]["ratio_vs_dense_wire"] >= 10]
    qualifying_mean = [n for n, c in by_config.items() if n != "dense_fp32" and c["ratio_vs_dense_run_bytes"] >= 10
                       and (len(c["seeds"]) > 1 or len(seeds) == 1)  # with repeats, a single DP run decides nothing
                       and c["accuracy_delta_vs_dense_mean"] >= -0.01 and dp_first.get(n, {}).get("same_epsilon_as_dense")]
    hundred = {n: {k: r.get(k) for k in ("ratio_vs_dense", "ratio_vs_dense_run_bytes", "ratio_vs_dense_wire", "final_accuracy", "accuracy_delta_vs_dense",
                                        "last3_delta_vs_dense", "max_epsilon")}
               for n, r in dp_first.items() if r["ratio_vs_dense_run_bytes"] >= 100}
    goal_met = {
        # DP runs draw their noise from the OS CSPRNG: one run per config moves by a few points, so the
        # verdict uses the mean over every seed of the configs run with several seeds (--repeat)
        "10x_within_1pt_same_epsilon": bool(qualifying_mean),
        "10x_within_1pt_same_epsilon_first_seed_only": bool(qualifying),
        "10x_within_1pt_same_epsilon_on_wire_bytes": bool([n for n in qualifying_mean if by_config[n]["ratio_vs_dense_wire"] >= 10]),
        "100x_point_within_1pt": any(dp_first[n]["within_1pt_of_dense"] for n in hundred) if hundred else False,
        "all_dp_runs_same_epsilon": all(r.get("same_epsilon_as_dense", False) for r in results.values() if r.get("dp") and "error" not in r),
        "no_failed_configs": not any("error" in r for r in results.values()),
    }

    caveats = [
        "Sites draw DP noise from the OS CSPRNG (since commit 1fe81c1), so DP runs are not reproducible even for a seed; "
        + (f"the dense fp32 DP runs here spread with a standard deviation of {dense_c['final_accuracy_std'] * 100:.1f} points over "
           f"{len(dense_c['seeds'])} runs, so a 1-point verdict from a few runs is not statistically resolved "
           f"(see delta_vs_dense_se in by_config_mean_over_seeds)." if dense_c and dense_c.get("final_accuracy_std") else "one run per config."),
        "An earlier pass with seeded DP noise and the lr 0.05 recipe (configs of one seed paired; see earlier_pass_seeded_dp_noise) put "
        "top-k 10% + int8 3.8 and 2.9 points below dense (seeds 7, 8); with this pass's spread a loss of ~2-3 points for top-k 10% "
        "cannot be excluded: treat the 10x verdict as 'no loss detected in the mean over seeds', not as a demonstrated 1-point bound.",
        "wire_bytes_up counts the update's Flower records as sent: one packed blob per reply (codec payload + zlib'd codec meta, "
        "~520 B of header and framing), so ratio_vs_dense_wire is below the payload ratio on this 10k-parameter model.",
        "Sparse models: DP clipping counts the active weights only (fedseek.privacy.masked_clipping, since this pass). The earlier "
        "mask80_int8 figures (0.30-0.33) were ghost clipping counting the pruned weights' gradients in every per-record norm.",
    ]
    report = {
        "benchmark": "communication",
        "caveats": caveats,
        "goal": GOAL,
        "goal_met": goal_met,
        "configs_meeting_10x_goal": qualifying_mean,
        "configs_meeting_10x_goal_first_seed_only": qualifying,
        "configs_meeting_10x_goal_first_seed_only_on_wire_bytes": qualifying_wire,
        "point_100x": hundred,
        "quick": args.quick,
        "setup": {
            "task": "digits 8x8 (sklearn), test_fraction 0.25 -> 450 test images; 1 accuracy point = 4.5 images",
            "sites": over.get("num_sites", 20), "partition": "dirichlet alpha 0.5", "model": "cnn (GroupNorm)",
            "strategy": "fedavg, all sites every round", "rounds": over["rounds"], "train": TRAIN, "privacy": PRIVACY,
            "noise": "calibrated per site by its ledger so the announced rounds fit epsilon_budget (noise_multiplier unset)",
            "seeds": seeds,
            "bytes": "bytes_up = exact codec payload bytes (sum over rounds and sites); wire_bytes_up adds record framing; "
                     "ratio_vs_dense = dense_bytes_up / bytes_up (fedseek's compression.ratio_up, the run's own fp32 baseline as the sites report it); "
                     "ratio_vs_dense_run_bytes = bytes_up of the dense fp32 run (same privacy setting and seed) / bytes_up of this run (the goal uses this); "
                     "ratio_vs_dense_wire = wire bytes of the dense fp32 run / wire bytes of this run",
            "accuracy": "central test accuracy of the final global model; within 1 point = delta >= -0.01",
        },
        "tuning": TUNING,
        "earlier_pass_seeded_dp_noise": EARLIER_SEEDED_NOISE,
        "by_config_mean_over_seeds": by_config,
        "scenarios": scenarios,
        "results": results,
        "total_wall_seconds": time.time() - t_all,  # this invocation (cached runs cost ~0 s)
        "runs_wall_seconds_sum": sum(r.get("wall_seconds", 0.0) for r in results.values()),  # as measured, cached or not
        "runs_cached": sum(1 for r in results.values() if r.get("cached")),
        "environment": environment(),
    }
    write_json(args.out, report)

    header = ["config", "DP", "seed", "bytes up/round", "total up", "ratio", "ratio wire", "final acc", "d acc", "d last3", "max eps"]
    body = []
    for r in results.values():
        if "error" in r:
            body.append([r["config"], fmt(r["dp"]), str(r["seed"]), "FAILED", "", "", "", "", "", "", ""])
            continue
        body.append([r["config"], fmt(r["dp"]), str(r["seed"]), f"{r['bytes_up_per_round_mean']:,.0f}", f"{r['bytes_up']:,}",
                     f"{r.get('ratio_vs_dense_run_bytes', 0):.1f}x", f"{r.get('ratio_vs_dense_wire', 0):.1f}x",
                     f"{r['final_accuracy']:.4f}", f"{r.get('accuracy_delta_vs_dense', 0) * 100:+.2f}",
                     f"{r.get('last3_delta_vs_dense', 0) * 100:+.2f}", fmt(r["max_epsilon"], ".3f")])
    print(table(body, header))
    print(f"goal: {GOAL}")
    print(f"goal_met: {goal_met}  (qualifying, mean over seeds: {qualifying_mean or 'none'})")
    print(f"wrote {args.out}  ({time.time() - t_all:.0f}s)")
    if tmp:
        tmp.cleanup()
    return 0


# Dense fp32 DP runs (codec none) at epsilon 8, seed 7, 20 sites, tried before fixing the recipe; max epsilon 7.996-7.999 in all.
TUNING = [
    {"rounds": 15, "train": {"local_epochs": 2, "lr": 0.05, "batch_size": 16, "momentum": 0.9}, "final_accuracy": 0.8267, "last3_mean": 0.8207},
    {"rounds": 15, "train": {"local_epochs": 2, "lr": 0.1, "batch_size": 32, "momentum": 0.9}, "final_accuracy": 0.8222, "last3_mean": 0.8163},
    {"rounds": 20, "train": {"local_epochs": 1, "lr": 0.1, "batch_size": 16, "momentum": 0.9}, "final_accuracy": 0.8178, "last3_mean": 0.8304},
    {"rounds": 30, "train": {"local_epochs": 1, "lr": 0.1, "batch_size": 32, "momentum": 0.9}, "final_accuracy": 0.8156, "last3_mean": 0.8148},
    {"rounds": 30, "train": {"local_epochs": 1, "lr": 0.05, "batch_size": 16, "momentum": 0.9}, "final_accuracy": 0.8444, "last3_mean": 0.8311, "chosen": True},
    {"rounds": 30, "train": {"local_epochs": 1, "lr": 0.25, "batch_size": 16, "momentum": 0.9}, "final_accuracy": 0.8400, "last3_mean": 0.8341},
    {"rounds": 20, "train": {"local_epochs": 2, "lr": 0.2, "batch_size": 16, "momentum": 0.5}, "final_accuracy": 0.8222, "last3_mean": 0.8111},
]

# A first full pass with the code before commit 1fe81c1, when the sites' DP noise was drawn from the
# seeded RNG (so a seed fixed the noise and configs of one seed were paired). Same scenarios as now.
# Final accuracy; bytes_up identical to now. Kept because the pairing makes these deltas less noisy.
EARLIER_SEEDED_NOISE = {
    "seed 7": {"dense_fp32": 0.8444, "fp16": 0.8444, "int8": 0.8444, "topk10_int8": 0.8067, "topk1_int8": 0.5689, "topk10_fp32": 0.8067,
               "topk10_int8_noef": 0.6467, "topk1_int8_noef": 0.2222, "mask80_int8": 0.3044, "mask90_int8": 0.1778,
               "mask80_codec_none": 0.3044, "mask80_int8_hooks": 0.6444},
    "seed 8": {"dense_fp32": 0.8733, "topk10_int8": 0.8444, "mask80_int8": 0.3022},
    "non-DP seed 7": {"dense_fp32": 0.9667, "topk10_int8": 0.9667},
}

if __name__ == "__main__":
    sys.exit(main())
