"""Output watermark under model extraction (issue 18): surrogates trained on served answers, and independent models.

For each dataset the served model is a real fedseek federation (`fedseek simulate`: digits, 20
sites, the GroupNorm CNN; breast cancer, 10 hospitals, MLP [64]). Its answers go through the
output watermark exactly as `fedseek serve` applies it (`fedseek.watermark.outputs.mark`, one
fresh key per trial). An attacker queries it with natural inputs (the training split; beyond its
size, rows again with N(0, 0.1) jitter on the standardised features), trains a surrogate on the
hard labels or the soft probabilities (same architecture as the served model, or another one),
optionally fine-tunes it on 10% of the test split's true labels or prunes 50% of its weights;
the owner tests it on the logged marked queries (exact binomial p-value). Negatives: models
trained independently on the true labels (several architectures and seeds), each tested
against a fresh key's mark log. The served accuracy is measured on the test split with and
without marking (its exact expectation over keys: half the marked rows' top-1 minus top-2 hits).

Usage: .venv/bin/python benchmarks/output_watermark.py [--trials 5] [--negatives 24] [--margins 0.1 0.2 0.3] [--quick]
Writes benchmarks/results/output_watermark.json.
"""

from __future__ import annotations

import argparse
import copy
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
from fedseek.watermark.outputs import mark, verdict

ALPHA = 1e-6
JITTER = 0.1


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


def rows_of(x: np.ndarray) -> list[list[float]]:
    """A query's raw row as the server sees it (the features, flattened)."""
    return x.reshape(len(x), -1).astype(np.float64).tolist()


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


def served_accuracy(model: torch.nn.Module, test: Any, margin: float, keys: int) -> dict[str, float]:
    """Clean accuracy, marked accuracy over `keys` fresh keys, its exact expectation, and the marked share of the test split."""
    p = probs(model, test.x)
    clean = float((p.argmax(1) == test.y).mean())
    rows = rows_of(test.x)
    accs, share = [], 0.0
    for _ in range(keys):
        m = mark(p, rows, os.urandom(32), margin)
        accs.append(float((m.labels == test.y).mean()))
        share = float(m.marked.mean())
    order = np.argsort(-p, 1)
    hit1, hit2 = (order[:, 0] == test.y).astype(float), (order[:, 1] == test.y).astype(float)
    marked = mark(p, rows, b"\0" * 32, margin).marked
    expected = clean - 0.5 * float(((hit1 - hit2) * marked).sum()) / len(test.y)
    return {"clean": clean, "served_mean": float(np.mean(accs)), "served_expected": expected, "drop_points_expected": 100 * (clean - expected),
            "marked_share_test": share}


def attack(ds: str, served: torch.nn.Module, train: Any, test: Any, *, n: int, soft: bool, which: str, margin: float, seed: int,
           epochs: int) -> dict[str, Any]:
    """One extraction: fresh key, n queries, surrogate trained on the answers; its p-values as trained, fine-tuned, pruned."""
    rng = np.random.default_rng(seed)
    subkey = os.urandom(32)
    xq = queries(train.x, n, rng)
    m = mark(probs(served, xq), rows_of(xq), subkey, margin)
    target = m.probs.astype(np.float32) if soft else m.labels
    sur = fit(arch(ds, which, train.input_shape, train.num_classes, seed), xq, target, soft=soft, epochs=epochs, seed=seed)
    logged, served_lab, other = xq[m.marked], m.labels[m.marked], m.other[m.marked]

    def pv(model: torch.nn.Module) -> float:
        return verdict(probs(model, logged).argmax(1), served_lab, other).p_value

    ft_idx = rng.permutation(len(test.x))[: max(10, len(test.x) // 10)]
    tuned = fit(copy.deepcopy(sur), test.x[ft_idx], test.y[ft_idx], soft=False, epochs=20, seed=seed + 1, lr=1e-3)
    pruned = magnitude_prune(sur, 0.5)
    return {"n_queries": n, "labels": "soft" if soft else "hard", "surrogate": which, "margin": margin, "marked": int(m.marked.sum()),
            "surrogate_agreement": float((probs(sur, test.x).argmax(1) == probs(served, test.x).argmax(1)).mean()),
            "surrogate_accuracy": float((probs(sur, test.x).argmax(1) == test.y).mean()),
            "p": pv(sur), "p_finetuned": pv(tuned), "p_pruned50": pv(pruned)}


def negatives(ds: str, served: torch.nn.Module, train: Any, count: int, margin: float, epochs: int) -> list[dict[str, Any]]:
    """Independent models (true labels, several architectures and seeds), each against a fresh key's log of 1000 queries."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(10_000 + i)
        xq = queries(train.x, 1000, rng)
        m = mark(probs(served, xq), rows_of(xq), os.urandom(32), margin)
        model = fit(arch(ds, "same" if i % 2 == 0 else "other", train.input_shape, train.num_classes, 500 + i), train.x, train.y,
                    soft=False, epochs=epochs, seed=500 + i)
        v = verdict(probs(model, xq[m.marked]).argmax(1), m.labels[m.marked], m.other[m.marked])
        # randomised p-value (exactly uniform under the null): P(X > m) + U * P(X = m), X ~ Binomial(n, 1/2)
        from scipy.stats import binom

        rand_p = float(binom.sf(v.matches, v.n, 0.5) + rng.uniform() * binom.pmf(v.matches, v.n, 0.5))
        out.append({"model": i, "marked": int(m.marked.sum()), "answered_in_pair": v.n, "matches": v.matches, "p": v.p_value,
                    "p_randomised": rand_p})
    return out


def served_model(ds: str, workdir: Path, quick: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fedseek federation's final model (digits CNN / breast-cancer MLP) and its run's figures."""
    sc = digits_scenario(rounds=4 if quick else 15) if ds == "digits" else breast_cancer_scenario(rounds=3 if quick else 10)
    res = _run(sc, workdir, f"served-{ds}")
    model = Predictor(workdir / f"out-served-{ds}", tables_only=False).model
    return model, {"final_accuracy": res.get("final_accuracy"), "scenario": sc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=24)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits"])
    ap.add_argument("--quick", action="store_true", help="2 trials, 4 negatives, one margin, short training (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.negatives, args.margins = 1, 4, [0.15]
    torch.set_num_threads(2)
    t0 = time.time()
    results: dict[str, Any] = {"environment": environment(), "alpha": ALPHA, "datasets": {}}
    workdir = Path(tempfile.mkdtemp(prefix="fedseek-owm-"))
    for ds in args.datasets:
        served, run_info = served_model(ds, workdir, args.quick)
        train, test = load_builtin(ds, run_info["scenario"]["seed"], test_fraction=run_info["scenario"]["data"].get("test_fraction", 0.25))
        epochs = 15 if args.quick else (60 if ds == "digits" else 100)
        budgets = [500, 1000, len(train)] if ds == "digits" else [500, 1000, 2000]
        entry: dict[str, Any] = {"served": run_info["final_accuracy"], "train_rows": len(train), "test_rows": len(test), "margins": {}}
        for margin in args.margins:
            acc = served_accuracy(served, test, margin, keys=20)
            trials = []
            for n in budgets:
                for soft in (False, True):
                    for which in ("same", "other"):
                        for t in range(args.trials):
                            r = attack(ds, served, train, test, n=n, soft=soft, which=which, margin=margin, seed=100 * t + n % 97,
                                       epochs=epochs)
                            trials.append(r)
                            log(f"{ds} margin {margin} n={n} {r['labels']} {which}: marked {r['marked']}, p {r['p']:.2e} "
                                f"(fine-tuned {r['p_finetuned']:.2e}, pruned {r['p_pruned50']:.2e}), agreement {r['surrogate_agreement']:.3f}")
            negs = negatives(ds, served, train, args.negatives, margin, epochs)
            from scipy.stats import kstest

            groups: dict[str, Any] = {}
            for r in trials:
                g = groups.setdefault(f"{r['n_queries']}/{r['labels']}/{r['surrogate']}", {"p": [], "ft": [], "pr": [], "marked": []})
                g["p"].append(r["p"])
                g["ft"].append(r["p_finetuned"])
                g["pr"].append(r["p_pruned50"])
                g["marked"].append(r["marked"])
            summary = {k: {"detected_share": float(np.mean([p <= ALPHA for p in g["p"]])),
                           "detected_share_finetuned": float(np.mean([p <= ALPHA for p in g["ft"]])),
                           "detected_share_pruned50": float(np.mean([p <= ALPHA for p in g["pr"]])),
                           "median_p": float(np.median(g["p"])), "median_marked": float(np.median(g["marked"]))} for k, g in groups.items()}
            entry["margins"][str(margin)] = {
                "accuracy": acc, "extraction": summary, "trials": trials,
                "negatives": {"flagged": sum(1 for r in negs if r["p"] <= ALPHA), "count": len(negs),
                              "min_p": min(r["p"] for r in negs), "ks_uniform_p": float(kstest([r["p_randomised"] for r in negs], "uniform").pvalue),
                              "models": negs}}
            log(f"{ds} margin {margin}: served accuracy {acc['clean']:.4f} -> {acc['served_expected']:.4f} expected "
                f"({acc['drop_points_expected']:.2f} points); negatives flagged {entry['margins'][str(margin)]['negatives']['flagged']}/{len(negs)}")
        results["datasets"][ds] = entry
    results["wall_seconds"] = time.time() - t0
    path = (QUICK_DIR if args.quick else RESULTS) / "output_watermark.json"
    write_json(path, results)
    log(f"wrote {path} ({results['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
