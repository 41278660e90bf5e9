"""Output watermark under model extraction (issue 18): surrogates trained on served answers, and independent models.

For each dataset the served model is a real fedseek federation (`fedseek simulate`: digits, 20
sites, the GroupNorm CNN; breast cancer, 10 hospitals, MLP [64]). Its answers go through the
output watermark exactly as `fedseek serve` applies it (`fedseek.watermark.outputs.mark`, one
fresh key per trial). An attacker queries it with natural inputs (the training split; beyond its
size, rows again with N(0, 0.1) jitter on the standardised features), trains a surrogate on the
hard labels or the soft probabilities (same architecture as the served model, or another one),
optionally fine-tunes it on 10% of the test split's true labels or prunes 50% of its weights;
the owner tests it on the logged marked queries, one trial per unit (cell and class pair): the
score test on the suspect's probabilities (what verify-outputs uses for a model) and the sign
test on its labels (an endpoint that returns labels only), both exact. Negatives: models trained independently on the true labels (several architectures
and seeds), each tested against a fresh key's mark log. The served accuracy is measured on the
test split with and without marking (its exact expectation over keys: half the marked rows'
top-1 minus top-2 hits), on the training rows (which the model has fitted: a pessimistic
figure), and out of sample by 4-fold cross-validation of centrally trained models of the served
architecture on the whole dataset (a proxy for unseen rows when the test split is small).

Usage: .venv/bin/python benchmarks/output_watermark.py [--trials 5] [--negatives 24] [--margins 0.1 0.2] [--quick]
(default margins: digits 0.15, breast cancer 0.4)
Writes benchmarks/results/output_watermark.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import QUICK_DIR, RESULTS, _run, breast_cancer_scenario, digits_scenario, environment, log, magnitude_prune, write_json

from fedseek.data import load_builtin
from fedseek.serving.predictor import Predictor
from fedseek.train.models import build_model
from fedseek.watermark.output_verdict import score_null, unit_gaps, verdict
from fedseek.watermark.outputs import SHARE, CellSpec, mark

ALPHA = 1e-6
JITTER = 0.1
MARGINS = {"digits": [0.15], "breast_cancer": [0.4]}
ABLATION = ("breast_cancer",)
PER_QUERY = CellSpec(planes=32, width=0.001)


def probs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()


def fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, soft: bool, epochs: int, seed: int, lr: float = 3e-3) -> torch.nn.Module:
    """The attacker's training: Adam, batch 64, cross-entropy on hard labels or on the served probabilities."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            out = model(xt[b])
            loss = -(yt[b].float() * torch.log_softmax(out, 1)).sum(1).mean() if soft else torch.nn.functional.cross_entropy(out, yt[b].long())
            loss.backward()
            opt.step()
    return model


def queries(train_x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n natural queries: training rows, then rows again with jitter once the split is used up."""
    if n <= len(train_x):
        return train_x[rng.permutation(len(train_x))[:n]]
    extra = train_x[rng.integers(0, len(train_x), n - len(train_x))]
    return np.concatenate([train_x, extra + rng.normal(0, JITTER, extra.shape).astype(np.float32)])


def arch(ds: str, which: str, shape: tuple[int, ...], k: int, seed: int) -> torch.nn.Module:
    """same: the served architecture; other: an MLP [128, 64] for the CNN, an MLP [32, 32] for the MLP [64]."""
    if ds == "digits":
        return build_model("cnn", shape, k, seed=seed) if which == "same" else build_model("mlp", shape, k, [128, 64], seed=seed)
    return build_model("mlp", shape, k, [64], seed=seed) if which == "same" else build_model("mlp", shape, k, [32, 32], seed=seed)


def expected_drop(p: np.ndarray, y: np.ndarray, margin: float) -> tuple[float, float]:
    """The exact expected accuracy drop over keys (points) of marking rows at `margin`, and the marked share."""
    order = np.argsort(-p, 1)
    idx = np.arange(len(p))
    marked = (p[idx, order[:, 0]] - p[idx, order[:, 1]]) <= margin
    hit1, hit2 = (order[:, 0] == y).astype(float), (order[:, 1] == y).astype(float)
    return 50.0 * float(((hit1 - hit2) * marked).sum()) / len(y), float(marked.mean())


def served_accuracy(model: torch.nn.Module, train: Any, test: Any, margin: float, keys: int) -> dict[str, float]:
    """Clean accuracy, marked accuracy over `keys` fresh keys, its exact expectation and the marked share (test split);
    the expected drop on the training rows too (in sample)."""
    p = probs(model, test.x)
    clean = float((p.argmax(1) == test.y).mean())
    accs = [float((mark(p, test.x, os.urandom(32), margin).labels == test.y).mean()) for _ in range(keys)]
    drop, share = expected_drop(p, test.y, margin)
    drop_train, share_train = expected_drop(probs(model, train.x), train.y, margin)
    return {"clean": clean, "served_mean": float(np.mean(accs)), "served_expected": clean - drop / 100, "drop_points_expected": drop,
            "marked_share_test": share, "drop_points_expected_train_rows": drop_train, "marked_share_train_rows": share_train}


def cross_validated_drop(ds: str, train: Any, test: Any, margins: list[float], epochs: int) -> dict[str, Any]:
    """Out-of-sample expected drop: 4-fold cross-validation of centrally trained models of the served architecture."""
    x, y = np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y])
    perm = np.random.default_rng(0).permutation(len(x))
    p = np.zeros((len(x), train.num_classes))
    for k, fold in enumerate(np.array_split(perm, 4)):
        rest = np.setdiff1d(perm, fold)
        model = fit(arch(ds, "same", train.input_shape, train.num_classes, 900 + k), x[rest], y[rest], soft=False, epochs=epochs, seed=900 + k)
        p[fold] = probs(model, x[fold])
    out = {"rows": len(x), "accuracy": float((p.argmax(1) == y).mean()), "margins": {}}
    for m in margins:
        drop, share = expected_drop(p, y, m)
        out["margins"][str(m)] = {"drop_points_expected": drop, "marked_share": share}
    return out


def attack(ds: str, served: torch.nn.Module, train: Any, test: Any, *, n: int, soft: bool, which: str, margin: float, seed: int,
           epochs: int, spec: CellSpec | None = None) -> dict[str, Any]:
    """One extraction: fresh key, n queries, surrogate trained on the answers; its p-values as trained, fine-tuned, pruned."""
    rng = np.random.default_rng(seed)
    subkey = os.urandom(32)
    xq = queries(train.x, n, rng)
    m = mark(probs(served, xq), xq, subkey, margin, spec)
    target = m.probs.astype(np.float32) if soft else m.labels
    sur = fit(arch(ds, which, train.input_shape, train.num_classes, seed), xq, target, soft=soft, epochs=epochs, seed=seed)
    logged, served_lab, other = xq[m.marked], m.labels[m.marked], m.other[m.marked]
    units = [m.units[i] for i in np.flatnonzero(m.marked)]

    def check(model: torch.nn.Module) -> Any:
        return test_suspect(probs(model, logged), served_lab, other, units)

    def pv(model: torch.nn.Module) -> tuple[float, float]:
        v = check(model)
        return v.p_value, v.p_sign

    ft_idx = rng.permutation(len(test.x))[: max(10, len(test.x) // 10)]
    tuned = fit(copy.deepcopy(sur), test.x[ft_idx], test.y[ft_idx], soft=False, epochs=20, seed=seed + 1, lr=1e-3)
    pruned = magnitude_prune(sur, 0.5)
    v = check(sur)
    (p_ft, p_ft_sign), (p_pr, p_pr_sign) = pv(tuned), pv(pruned)
    return {"n_queries": n, "labels": "soft" if soft else "hard", "surrogate": which, "margin": margin, "marked": int(m.marked.sum()),
            "units": v.units, "units_in_pair": v.n, "units_matched": v.matches, "p_sign": v.p_sign, "p_finetuned_sign": p_ft_sign,
            "p_pruned50_sign": p_pr_sign,
            "surrogate_agreement": float((probs(sur, test.x).argmax(1) == probs(served, test.x).argmax(1)).mean()),
            "surrogate_accuracy": float((probs(sur, test.x).argmax(1) == test.y).mean()),
            "p": v.p_value, "p_finetuned": p_ft, "p_pruned50": p_pr}


def test_suspect(q: np.ndarray, served: np.ndarray, other: np.ndarray, units: list[str]) -> Any:
    """verify-outputs' verdict on a model suspect: the score test on its probabilities (p_value) and the sign test (p_sign)."""
    return verdict(q.argmax(1), served, other, units, ALPHA, suspect_probs=[{str(k): float(v) for k, v in enumerate(row)} for row in q])


def negatives(ds: str, served: torch.nn.Module, train: Any, count: int, margin: float, epochs: int) -> list[dict[str, Any]]:
    """Independent models (true labels, several architectures and seeds), each against a fresh key's log of 1000 queries."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(10_000 + i)
        xq = queries(train.x, 1000, rng)
        m = mark(probs(served, xq), xq, os.urandom(32), margin)
        model = fit(arch(ds, "same" if i % 2 == 0 else "other", train.input_shape, train.num_classes, 500 + i), train.x, train.y,
                    soft=False, epochs=epochs, seed=500 + i)
        v = test_suspect(probs(model, xq[m.marked]), m.labels[m.marked], m.other[m.marked], [m.units[j] for j in np.flatnonzero(m.marked)])
        # randomised p-value (exactly uniform under the null): P(X > m) + U * P(X = m), X ~ Binomial(n, 1/2)
        from scipy.stats import binom

        rand_p_sign = float(binom.sf(v.matches, v.n, 0.5) + rng.uniform() * binom.pmf(v.matches, v.n, 0.5))
        q = [{str(k): float(p) for k, p in enumerate(row)} for row in probs(model, xq[m.marked])]
        dist, observed, _ = score_null(unit_gaps(q, m.labels[m.marked], m.other[m.marked], [m.units[j] for j in np.flatnonzero(m.marked)]))
        rand_p = float(dist[observed + 1 :].sum() + rng.uniform() * dist[observed])
        out.append({"model": i, "marked": int(m.marked.sum()), "units": v.units, "units_in_pair": v.n, "matches": v.matches, "p": v.p_value,
                    "p_sign": v.p_sign,
                    "p_randomised": rand_p, "p_sign_randomised": rand_p_sign})
    return out


def served_model(ds: str, workdir: Path, quick: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fedseek federation's final model (digits CNN / breast-cancer MLP) and its run's figures."""
    sc = digits_scenario(rounds=4 if quick else 15) if ds == "digits" else breast_cancer_scenario(rounds=3 if quick else 10)
    res = _run(sc, workdir, f"served-{ds}")
    model = Predictor(workdir / f"out-served-{ds}", tables_only=False).model
    return model, {"final_accuracy": res.get("final_accuracy"), "scenario": sc}


def averaging_attack(ds: str, served: torch.nn.Module, train: Any, *, margin: float, soft: bool, seed: int, epochs: int,
                     spec: CellSpec) -> dict[str, Any]:
    """An extractor that asks each of 200 natural rows 5 times with N(0, 0.1) jitter (1,000 queries), averages the 5 answers
    and trains on the averaged answer of each row: a mark that differs between near-duplicates averages away."""
    rng = np.random.default_rng(seed)
    base = train.x[rng.permutation(len(train.x))[:200]]
    xq = np.repeat(base, 5, axis=0)
    xq = xq + rng.normal(0, JITTER, xq.shape).astype(np.float32)
    m = mark(probs(served, xq), xq, os.urandom(32), margin, spec)
    avg = m.probs.reshape(200, 5, -1).mean(1)
    if soft:
        target: np.ndarray = avg.astype(np.float32)
    else:
        votes = np.stack([np.bincount(row, minlength=avg.shape[1]) for row in m.labels.reshape(200, 5)])
        target = np.where(votes.max(1) >= 3, votes.argmax(1), avg.argmax(1))  # the majority answer (probabilities break a tie)
    sur = fit(arch(ds, "same", train.input_shape, train.num_classes, seed), base, target, soft=soft, epochs=epochs, seed=seed)
    sel = np.flatnonzero(m.marked)
    v = test_suspect(probs(sur, xq[sel]), m.labels[sel], m.other[sel], [m.units[i] for i in sel])
    return {"labels": "averaging/" + ("soft" if soft else "hard"), "marked": len(sel), "units": v.units, "units_in_pair": v.n,
            "units_matched": v.matches, "p_sign": v.p_sign, "p": v.p_value}


def filtering_attack(ds: str, served: torch.nn.Module, train: Any, *, margin: float, which: str, seed: int, epochs: int) -> dict[str, Any]:
    """An extractor who knows the scheme and trains on the probabilities: it drops every answer whose top class holds exactly
    the marked share (90%) of the top-two mass, which is every marked answer, and trains on the rest (1,000 queries)."""
    rng = np.random.default_rng(seed)
    xq = queries(train.x, 1000, rng)
    m = mark(probs(served, xq), xq, os.urandom(32), margin)
    top2 = np.sort(m.probs, 1)[:, -2:]
    keep = ~np.isclose(top2[:, 1] / top2.sum(1), SHARE, rtol=0, atol=1e-9)
    sur = fit(arch(ds, which, train.input_shape, train.num_classes, seed), xq[keep], m.probs[keep].astype(np.float32), soft=True,
              epochs=epochs, seed=seed)
    sel = np.flatnonzero(m.marked)
    v = test_suspect(probs(sur, xq[sel]), m.labels[sel], m.other[sel], [m.units[i] for i in sel])
    return {"labels": "filtering/soft", "surrogate": which, "marked": len(sel), "dropped": int((~keep).sum()), "units": v.units,
            "units_in_pair": v.n, "units_matched": v.matches, "p_sign": v.p_sign, "p": v.p_value}


def ablation(ds: str, served: torch.nn.Module, train: Any, test: Any, margin: float, epochs: int, trials: int) -> dict[str, Any]:
    """The same extraction (1,000 queries) with a cell per query (32 projections at width 0.001: the first version's bit per
    query) against the default cells: how many units a surrogate reproduces, and whether averaging near-duplicate answers
    removes the mark; and, with the default cells, an extractor that filters out the marked answers by their probabilities."""
    out: dict[str, Any] = {"margin": margin, "n_queries": 1000, "per_query": PER_QUERY.__dict__, "default": CellSpec().__dict__}
    for name, spec in (("per_query", PER_QUERY), ("default", CellSpec())):
        rows = []
        for soft in (False, True):
            for which in ("same", "other"):
                for t in range(trials):
                    r = attack(ds, served, train, test, n=1000, soft=soft, which=which, margin=margin, seed=7000 + 100 * t, epochs=epochs,
                               spec=spec)
                    rows.append(r)
                    log(f"ablation {ds} {name} {r['labels']} {which}: {r['units']} units, matched {r['units_matched']}/{r['units_in_pair']}, "
                        f"sign p {r['p_sign']:.1e}, score p {r['p']:.1e}")
        for soft in (False, True):
            for t in range(trials):
                r = averaging_attack(ds, served, train, margin=margin, soft=soft, seed=8000 + 100 * t, epochs=epochs, spec=spec)
                rows.append(r)
                log(f"ablation {ds} {name} averaging {r['labels']}: {r['units']} units, matched {r['units_matched']}/{r['units_in_pair']}, "
                    f"sign p {r['p_sign']:.1e}, score p {r['p']:.1e}")
        if name == "default":
            for which in ("same", "other"):
                for t in range(trials):
                    r = filtering_attack(ds, served, train, margin=margin, which=which, seed=9000 + 100 * t, epochs=epochs)
                    rows.append(r)
                    log(f"ablation {ds} filtering soft {which}: dropped {r['dropped']}, matched {r['units_matched']}/{r['units_in_pair']}, "
                        f"sign p {r['p_sign']:.1e}, score p {r['p']:.1e}")
        for labels in ("hard", "soft", "averaging/hard", "averaging/soft", "filtering/soft"):
            sel = [r for r in rows if r["labels"] == labels]
            if not sel:
                continue
            out[f"{name}/{labels}"] = {"trials": len(sel), "median_units": float(np.median([r["units"] for r in sel])),
                                       "reproduced_share": float(sum(r["units_matched"] for r in sel) / max(1, sum(r["units_in_pair"] for r in sel))),
                                       "detected_share_sign": float(np.mean([r["p_sign"] <= ALPHA for r in sel])),
                                       "detected_share_score": float(np.mean([r["p"] <= ALPHA for r in sel]))}
    return out


def ablation_only(trials: int) -> int:
    """Re-run the ablation of the datasets in ABLATION (same served federations) and merge it into the results file."""
    path = RESULTS / "output_watermark.json"
    results = json.loads(path.read_text())
    workdir = Path(tempfile.mkdtemp(prefix="fedseek-owm-"))
    for ds in ABLATION:
        served, run_info = served_model(ds, workdir, False)
        train, test = load_builtin(ds, run_info["scenario"]["seed"], test_fraction=run_info["scenario"]["data"].get("test_fraction", 0.25))
        results["datasets"][ds]["ablation_per_query_cells"] = ablation(ds, served, train, test, MARGINS[ds][0], 100, trials)
    results["ablation_environment"] = environment()
    write_json(path, results)
    log(f"merged the ablation into {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=24)
    ap.add_argument("--margins", type=float, nargs="+", default=None, help="for every dataset (default: digits 0.15, breast cancer 0.4)")
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits"])
    ap.add_argument("--quick", action="store_true", help="2 trials, 4 negatives, one margin, short training (smoke run)")
    ap.add_argument("--ablation-only", action="store_true", help="re-run the per-query-cell ablation into the existing results file")
    args = ap.parse_args()
    if args.ablation_only:
        return ablation_only(args.trials)
    if args.quick:
        args.trials, args.negatives, args.margins = 1, 4, [0.15]
    torch.set_num_threads(2)
    t0 = time.time()
    results: dict[str, Any] = {"environment": environment(), "alpha": ALPHA, "cells": {"planes": CellSpec().planes, "width": CellSpec().width},
                               "datasets": {}}
    workdir = Path(tempfile.mkdtemp(prefix="fedseek-owm-"))
    for ds in args.datasets:
        served, run_info = served_model(ds, workdir, args.quick)
        train, test = load_builtin(ds, run_info["scenario"]["seed"], test_fraction=run_info["scenario"]["data"].get("test_fraction", 0.25))
        epochs = 15 if args.quick else (60 if ds == "digits" else 100)
        budgets = [500, 1000, len(train)] if ds == "digits" else [500, 1000, 2000]
        margins = args.margins or MARGINS[ds]
        entry: dict[str, Any] = {"served": run_info["final_accuracy"], "train_rows": len(train), "test_rows": len(test), "margins": {},
                                 "cross_validated_drop": cross_validated_drop(ds, train, test, margins, epochs)}
        for margin in margins:
            acc = served_accuracy(served, train, test, margin, keys=20)
            trials = []
            for n in budgets:
                for soft in (False, True):
                    for which in ("same", "other"):
                        for t in range(args.trials):
                            r = attack(ds, served, train, test, n=n, soft=soft, which=which, margin=margin, seed=100 * t + n % 97,
                                       epochs=epochs)
                            trials.append(r)
                            log(f"{ds} margin {margin} n={n} {r['labels']} {which}: marked {r['marked']} in {r['units']} units, "
                                f"matched {r['units_matched']}/{r['units_in_pair']} (sign p {r['p_sign']:.1e}), p {r['p']:.2e} "
                                f"(fine-tuned {r['p_finetuned']:.2e}, pruned {r['p_pruned50']:.2e}), agreement {r['surrogate_agreement']:.3f}")
            negs = negatives(ds, served, train, args.negatives, margin, epochs)
            from scipy.stats import kstest

            groups: dict[str, Any] = {}
            for r in trials:
                g = groups.setdefault(f"{r['n_queries']}/{r['labels']}/{r['surrogate']}", {"p": [], "ft": [], "pr": [], "marked": [],
                                                                                        "units": [], "ps": [], "fts": [], "prs": []})
                g["units"].append(r["units"])
                g["ps"].append(r["p_sign"])
                g["fts"].append(r["p_finetuned_sign"])
                g["prs"].append(r["p_pruned50_sign"])
                g["p"].append(r["p"])
                g["ft"].append(r["p_finetuned"])
                g["pr"].append(r["p_pruned50"])
                g["marked"].append(r["marked"])
            summary = {k: {"detected_share": float(np.mean([p <= ALPHA for p in g["p"]])),
                           "detected_share_finetuned": float(np.mean([p <= ALPHA for p in g["ft"]])),
                           "detected_share_pruned50": float(np.mean([p <= ALPHA for p in g["pr"]])),
                           "median_p": float(np.median(g["p"])), "median_marked": float(np.median(g["marked"])),
                           "median_units": float(np.median(g["units"])), "trials": len(g["p"]),
                           "sign_test": {"detected_share": float(np.mean([p <= ALPHA for p in g["ps"]])),
                                         "detected_share_finetuned": float(np.mean([p <= ALPHA for p in g["fts"]])),
                                         "detected_share_pruned50": float(np.mean([p <= ALPHA for p in g["prs"]])),
                                         "median_p": float(np.median(g["ps"]))}} for k, g in groups.items()}
            entry["margins"][str(margin)] = {
                "accuracy": acc, "extraction": summary, "trials": trials,
                "negatives": {"flagged": sum(1 for r in negs if r["p"] <= ALPHA), "count": len(negs),
                              "flagged_sign": sum(1 for r in negs if r["p_sign"] <= ALPHA), "min_p_sign": min(r["p_sign"] for r in negs),
                              "min_p": min(r["p"] for r in negs), "ks_uniform_p": float(kstest([r["p_randomised"] for r in negs], "uniform").pvalue),
                              "ks_uniform_p_sign": float(kstest([r["p_sign_randomised"] for r in negs], "uniform").pvalue),
                              "models": negs}}
            log(f"{ds} margin {margin}: served accuracy {acc['clean']:.4f} -> {acc['served_expected']:.4f} expected "
                f"({acc['drop_points_expected']:.2f} points); negatives flagged {entry['margins'][str(margin)]['negatives']['flagged']}/{len(negs)}")
        if ds in ABLATION and not args.quick:
            entry["ablation_per_query_cells"] = ablation(ds, served, train, test, margins[0], epochs, args.trials)
        results["datasets"][ds] = entry
    results["wall_seconds"] = time.time() - t0
    path = (QUICK_DIR if args.quick else RESULTS) / "output_watermark.json"
    write_json(path, results)
    log(f"wrote {path} ({results['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
