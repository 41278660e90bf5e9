"""Empirical privacy audit of fedseek's DP-SGD: a one-run canary audit (Steinke et al. 2023) and LiRA (Carlini et al. 2022).

Writes benchmarks/results/privacy_audit.json (``--quick``: the temp dir, never the real figures) and prints a table.

    .venv/bin/python benchmarks/privacy_audit.py            # default: ~5-8 min on 2 cores (3 configurations x 17 federations)
    .venv/bin/python benchmarks/privacy_audit.py --quick    # smoke: ~1 min (5 federations, 300 canaries, 3 rounds, MLP [64])
    .venv/bin/python benchmarks/privacy_audit.py --distributed --only dp_eps3_distributed,dp_eps8_distributed  # adds distributed DP
    options: --budgets 3,8  --canaries 500  --federations 17  --workers 2  --out PATH   (prefix `nice -n 10` on a shared machine)

What is trained
---------------
Every configuration (DP with epsilon budget 3, DP with budget 8, no DP) runs 17 independent federations, in-process,
without Flower, along the site's real code path: each round, each site builds the announced model, loads the global
weights, passes its own privacy gate (``fedseek.runtime.site_privacy.training_gate``: policy check, ledger locked, noise
from the site's own policy, the round charged BEFORE training; a reproduction of ``site._dp_round`` if the tree's ledger
predates that, recorded as ``dp_code_path``) and trains with ``fedseek.train.local.train_local`` (Opacus DP-SGD through
``DPRound``: secret Poisson batches, per-sample clipping at C = 1, CSPRNG noise); the coordinator adds the
num-examples-weighted mean of the sites' deltas (FedAvg; dense fp32 uplink, i.e. the codec "none"). Each site and each
federation gets a fresh ledger in a temp dir; noise is the site's default "fit the budget" calibration (RDP accountant,
delta 1e-5, the budget spread over its 5 planning rounds). No DP: the same with ``privacy=None``.

Task: sklearn digits (flattened 8x8, 64 features, 10 classes), fedseek's tabular MLP [256], 5 rounds x 10 local epochs,
batch 16, lr 0.2. Four small sites, chosen to overfit so that the non-DP run leaks visibly: site-000, the audit site (60
real records + the canaries), site-001, the LiRA target (200 candidate records, each in with probability 1/2), and two
sites of 100 records.

Audit 1: one-run canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023)
-----------------------------------------------------------------------
m = 500 canaries, each included independently with probability 1/2 (``secrets``), all at the audit site. All at one site
because the hypothesis under test is one ledger's claim (site-000's epsilon): every canary then has the same sample rate,
steps and noise, so one threshold ranks them fairly; spread over sites they would each be covered by a different,
separately calibrated ledger, and the test would be of the loosest of several claims with fewer canaries each.

Canaries are the input-space form of the paper's white-box Dirac gradient canaries, which gave its tightest audits:
canary j is (2 * e_(64+j), random label), a record that is zero on every real feature and non-zero on one extra input
column that no other record touches (the MLP's input is widened by m columns, zero for real records). Its clipped
gradient lands almost entirely in first-layer column 64+j (the rest in shared biases and the output layer), so column
64+j carries that canary's signal plus DP noise only. Score = the column's movement projected on the canary's own
gradient direction (of log p(y_j | x_j), taken with the canary columns at their initial, public values), two views:

* final model: (w_final - w_init)[:, 64+j], direction at the final global model. This is what anyone who receives the
  model can compute; it also carries the other sites' noise, which the per-site ledger (rightly) does not count on.
* coordinator: the sum over rounds of the audit site's own delta on that column, direction averaged along the path from
  the model sent to the model returned (Simpson). This is exactly what the site's epsilon covers: its released deltas.

The auditor guesses "in" for the k+ highest scores, "out" for the k- lowest, abstains between, on a fixed grid of six
(k+, k-) (2% ... 100% of the canaries, symmetric), each at level 0.05 / 6 (Bonferroni), so the best of the grid is a
valid 95% bound. The bound (benchmarks/_audit_bound.py, checked by tests/test_audit_bound.py) is the paper's: if the run
is (eps, delta)-DP, P[>= v correct of r guesses] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha; the
reported epsilon is the largest eps whose tail is still below the level. The first federation of a configuration is the
audited run (decided before training); the other 16 are independent repetitions of the same procedure, reported as a
spread (min-median-max), which is NOT itself a 95% bound (taking the max over runs would be a multiple test).

Distributed DP (``--distributed``: configurations ``dp_eps*_distributed``): every site runs privacy.mode distributed
(``site_secure.distributed_recipe``: one clipped full-batch step per round, lr 0.5 / C, noise share sigma / sqrt(4) through
the same gate and ledger), and the coordinator adds the example-weighted mean of the sites' steps, exactly the sum SecAgg+
unmasks (to its quantization; the masking itself is tested in tests/test_distributed_dp.py). The claim under test is the
audit site's ledger epsilon, which counts on the four shares together; the coordinator view is then each round's
aggregate step (nothing finer is ever unmasked).

Audit 2: LiRA (Carlini et al., S&P 2022)
----------------------------------------
The 17 federations of a configuration double as shadow models: each draws its own in/out split of the target site's
200 candidates. Each federation is the target in turn, the 16 others its shadows; per candidate, Gaussians are fitted to
the logit-scaled confidence phi = log p_y - log(1 - p_y) of the final global model where it was in and where it was out
(per-example means, variances pooled over examples: the paper's choice below 64 shadows); the score is the log
likelihood ratio of the target's phi. Reported: AUC over all 17 x 200 target scores (95% CI by Hanley & McNeil, which
treats the scores as independent; they share shadows, so the interval is somewhat optimistic), TPR at 1% and 0.1% FPR,
the first target's AUC, and the plain confidence-threshold attack for comparison. Under (eps, delta)-DP every attack has
TPR <= e^eps FPR + delta: at eps 8 that allows far more than an AUC a few points above 0.5, at eps 3 it still allows some.

How to read the numbers (for a privacy report)
----------------------------------------------
"LB" is a statement about the run: with 95% confidence it is NOT (LB, delta)-DP. It can falsify an accounting claim (a
LB above the accounted epsilon would reveal a bug in clipping, noise, sampling or accounting), but it cannot confirm
one, and a LB far below the accounted epsilon is expected. It does NOT mean the accounting is loose by that factor:

* The method's reach is limited. With m = 500 canaries even a perfect attacker, facing a mechanism that is exactly
  (accounted eps, delta)-DP (a Gaussian), certifies only the "LB perfect attack" column (median over simulations), and
  all 500 guesses right certifies at most ~4.6 ("cap"): the non-DP row, whose true epsilon is infinite, gets ~3.9 (250
  of 250 right; a few included canaries move against the estimated direction, so guessing all 500 scores lower).
* The accountant bounds an adversary who sees every one of the ~1000 noisy DP-SGD steps and may pick worst-case
  neighbouring datasets and gradients; the audit sees 5 round deltas (coordinator) or one final model, and its canaries
  share their clipped norm with biases and output layer and change gradient direction during training.
* RDP-to-(eps, delta) conversion and composition are upper bounds; the tight epsilon of the same noise is lower.
* The final-model view also carries the other sites' noise, which the per-site ledger does not take credit for.

So: DP rows with LB well below the accounted epsilon and LiRA AUC near 0.5 are consistent with the guarantee, and the
non-DP row shows the same attacks do detect membership when there is no DP (canaries identified perfectly, up to the
method's cap; LiRA AUC clearly above 0.5). Both are empirical checks of this recipe on this task, not proofs.

Limitations: the canaries are crafted (worst-case-ish records, as DP must cover any record); LiRA's 16 shadows and the
4-site, 5-round federation are small for the 2-core time budget; the site's record count is public in fedseek (num-examples
is sent in the clear and weights FedAvg; the sample rate 1/ceil(n/B) and the calibrated noise depend on n, as in Opacus),
so under add/remove adjacency the count itself is outside the guarantee, and this audit does not exploit it; DP test accuracy is low because the sites are tiny and
overfitting-prone on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import multiprocessing as mp
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _audit_bound import audit, epsilon_ceiling  # noqa: E402
from _common import QUICK_DIR, RESULTS, environment, log, write_json  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """Everything that decides a federation (the same for the audited run and its shadows)."""

    dataset: str = "digits"
    data_seed: int = 11
    hidden: tuple[int, ...] = (256,)
    rounds: int = 5
    local_epochs: int = 10
    batch_size: int = 16
    lr: float = 0.2
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    canaries: int = 500
    canary_scale: float = 2.0
    audit_site_records: int = 60  # real records at the audit site, next to its canaries
    target_candidates: int = 200  # real records of the LiRA target site, each in with probability 1/2
    other_sites: int = 2
    other_site_records: int = 100
    federations: int = 17  # 1 audited run + 16 shadows per configuration


@dataclass
class RunConfig:
    """One audited configuration: DP with an epsilon budget, or no DP."""

    name: str
    epsilon_budget: float | None  # None: no DP (privacy=None at every site)
    setup: Setup = field(default_factory=Setup)
    mode: str = "local"  # distributed: every site's noise share summed (privacy.mode distributed, all 4 sites, no colluder)


# ----------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def federation_data(setup: Setup) -> dict[str, Any]:
    """Records of every site (real features padded with one zero column per canary), the canaries, and a test set.

    Canary j is the record (s * e_{d+j}, y_j): zero on every real feature and `canary_scale` on its own
    extra input column, which no other record touches. Its gradient therefore lands (almost) only in
    column d+j of the first layer, the input-space realisation of the paper's Dirac gradient canaries.
    """
    from fedseek.data import load_builtin

    kw = {"as_images": False} if setup.dataset == "digits" else {}
    train, test = load_builtin(setup.dataset, setup.data_seed, **kw)
    x = train.x.reshape(len(train.y), -1).astype(np.float32)
    y = train.y.astype(np.int64)
    k = int(train.num_classes)
    rng = np.random.default_rng(setup.data_seed)  # public choices of the auditor (who holds which record, canary labels)
    order = rng.permutation(len(y))
    sizes = [setup.audit_site_records, setup.target_candidates] + [setup.other_site_records] * setup.other_sites
    if sum(sizes) > len(y):
        raise ValueError(f"{sum(sizes)} records asked, the {setup.dataset} train split has {len(y)}")
    bounds = np.cumsum([0, *sizes])
    parts = [order[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    d, m = x.shape[1], setup.canaries

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((len(a), m), np.float32)], axis=1)

    canary_x = np.zeros((m, d + m), np.float32)
    canary_x[np.arange(m), d + np.arange(m)] = setup.canary_scale
    return {
        "x": [pad(x[p]) for p in parts], "y": [y[p] for p in parts], "num_classes": k, "real_features": d,
        "canary_x": canary_x, "canary_y": rng.integers(0, k, m).astype(np.int64),
        "test_x": pad(test.x.reshape(len(test.y), -1).astype(np.float32)), "test_y": test.y.astype(np.int64),
    }


def secure_bits(n: int) -> np.ndarray:
    """n fair coins from the OS CSPRNG (the paper's requirement: inclusion unpredictable to everyone but the auditor)."""
    return np.unpackbits(np.frombuffer(secrets.token_bytes((n + 7) // 8), dtype=np.uint8))[:n].astype(bool)


# ----------------------------------------------------------------------------------------- one federation


def _privacy_spec(cfg: RunConfig) -> Any:
    from fedseek.config import PrivacySpec

    if cfg.epsilon_budget is None:
        return None
    s = cfg.setup
    extra: dict[str, Any] = {}
    if cfg.mode == "distributed":  # the sum of all the federation's shares carries the accounted noise
        extra = {"mode": "distributed", "distributed": {"min_sites": 2 + s.other_sites, "colluders": 0}}
    return PrivacySpec(epsilon_budget=cfg.epsilon_budget, delta=s.delta, max_grad_norm=s.max_grad_norm, accountant=s.accountant,
                       planning_rounds=s.rounds, max_local_epochs=max(10, s.local_epochs), **extra)


def _dp_gate() -> tuple[Any, Any, str]:
    """The site's own DP gate, fedseek.runtime.site_privacy.training_gate (policy check, ledger lock, noise plan, charge before training)."""
    from fedseek.runtime.site_privacy import policy_refusal, training_gate

    return training_gate, policy_refusal, "fedseek.runtime.site_privacy.training_gate"


def _train_site(site: Any, cfg: Any, model: Any, seed: int) -> Any:
    """handle_train without Flower: the site's policy check, its locked and pre-charged DP gate, then train_local."""
    from fedseek.train.local import train_local

    gate_fn, refusal_fn, _ = _dp_gate()
    if refusal_fn is not None and (reason := refusal_fn(site, cfg)) is not None:
        raise RuntimeError(f"{site.name} refuses round {cfg.server_round}: {reason}")
    kw = {"num_classes": site.num_classes, "epochs": cfg.local_epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "momentum": cfg.momentum,
          "device": "cpu", "seed": seed}
    if site.privacy is None:
        return train_local(model, site.x, site.y, **kw), None
    with gate_fn(site, cfg) as gate:
        if gate.refusal is not None:
            raise RuntimeError(f"{site.name} refuses round {cfg.server_round}: {gate.refusal}")
        res = train_local(model, site.x, site.y, privacy=gate.dp, **kw)
        return res, gate.ledger


def _arrays(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def _load(model: Any, arrays: dict[str, np.ndarray]) -> Any:
    import torch

    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    return model


def canary_directions(model: Any, arrays: dict[str, np.ndarray], canary_x: np.ndarray, canary_y: np.ndarray, d: int) -> np.ndarray:
    """Unit vectors (hidden x m): for canary j, the direction in which its own training pushes first-layer column d+j.

    The gradient of log p(y_j | x_j) with respect to that column at the model `arrays`: one backward pass for
    all canaries, since canary j's input is zero on every other canary column.
    """
    import torch

    _load(model, arrays)
    model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(torch.from_numpy(canary_x)), dim=1)
    logp[torch.arange(len(canary_y)), torch.from_numpy(canary_y)].sum().backward()
    g = model.net[0].weight.grad[:, d:].numpy().astype(np.float64)
    return g / np.maximum(np.linalg.norm(g, axis=0, keepdims=True), 1e-12)


def _reset_canaries(arrays: dict[str, np.ndarray], init: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
    """`arrays` with every canary column of the first layer back at its initial value (the model had no canary moved it)."""
    w = arrays["net.0.weight"].copy()
    w[:, d:] = init["net.0.weight"][:, d:]
    return {**arrays, "net.0.weight": w}


def logit_confidence(model: Any, arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's statistic: log p_y - log(1 - p_y), computed stably from the logits."""
    import torch

    _load(model, arrays).eval()
    with torch.no_grad():
        z = model(torch.from_numpy(x)).double()
    zy = z[torch.arange(len(y)), torch.from_numpy(y)]
    others = z.clone()
    others[torch.arange(len(y)), torch.from_numpy(y)] = -math.inf
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def run_federation(cfg: RunConfig, index: int) -> dict[str, Any]:
    """One federation: fresh ledgers, secret canary and candidate inclusion, FedAvg of the sites' deltas; the auditor's view of it."""
    import torch

    from fedseek.runtime.site_runtime import SiteRuntime
    from fedseek.runtime.site_secure import distributed_recipe
    from fedseek.train.local import evaluate
    from fedseek.train.models import build_model
    from fedseek.wire.records import RoundConfig

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    s = cfg.setup
    data = federation_data(s)
    d, m, k = data["real_features"], s.canaries, data["num_classes"]
    canary_in, cand_in = secure_bits(m), secure_bits(s.target_candidates)
    xs, ys = list(data["x"]), list(data["y"])
    xs[0] = np.concatenate([xs[0], data["canary_x"][canary_in]])
    ys[0] = np.concatenate([ys[0], data["canary_y"][canary_in]])
    xs[1], ys[1] = xs[1][cand_in], ys[1][cand_in]
    policy = _privacy_spec(cfg)
    seed = 1000 * (index + 1) + (0 if policy is None else int(cfg.epsilon_budget * 10))
    input_dim = d + m
    meta = {"kind": "mlp", "hidden": list(s.hidden), "input_shape": [input_dim], "num_classes": k}
    with tempfile.TemporaryDirectory(prefix="fedseek-audit-") as tmp:
        sites = [SiteRuntime(name=f"site-{i:03d}", x=xs[i], y=ys[i], num_classes=k, privacy=policy, state_dir=Path(tmp) / f"site-{i:03d}",
                             device="cpu", num_sites=len(xs), index=i) for i in range(len(xs))]
        model = build_model("mlp", (input_dim,), k, list(s.hidden), seed=seed)
        init = _arrays(model)
        glob = {kk: v.copy() for kk, v in init.items()}
        coord_score = np.zeros(m)
        noise: dict[str, set[float]] = {}
        ledgers: dict[str, float] = {}
        for rnd in range(1, s.rounds + 1):
            rc = RoundConfig.model_validate({"server-round": rnd, "num-rounds": s.rounds, "lr": s.lr, "local-epochs": s.local_epochs,
                                             "batch-size": s.batch_size, "model": meta, "seed": seed, "run-id": f"audit-{cfg.name}-{index}"})
            num, den = {kk: np.zeros_like(v, dtype=np.float64) for kk, v in glob.items()}, 0
            for i, site in enumerate(sites):
                local = _load(build_model("mlp", (input_dim,), k, list(s.hidden)), glob)
                site_rc = distributed_recipe(site, rc) if cfg.mode == "distributed" else rc
                res, ledger = _train_site(site, site_rc, local, seed * 100003 + rnd * 1009 + i)
                delta = {kk: v - glob[kk] for kk, v in _arrays(local).items()}
                if i == 0 and cfg.mode != "distributed":
                    coord_score += _coordinator_score(model, glob, delta, init, data)
                if res.dp:
                    noise.setdefault(site.name, set()).add(round(float(res.dp["noise_multiplier"]), 4))
                if ledger is not None:
                    ledgers[site.name] = float(ledger.epsilon())
                n = int(res.num_examples)
                for kk in num:
                    num[kk] += n * delta[kk]
                den += n
            step = {kk: num[kk] / den for kk in glob}  # FedAvg, weighted by num-examples; distributed: what SecAgg+ unmasks
            if cfg.mode == "distributed":  # the coordinator sees only the sum: its view is each round's aggregate step
                coord_score += _coordinator_score(model, glob, step, init, data)
            glob = {kk: (glob[kk] + step[kk]).astype(np.float32) for kk in glob}
        # The final model's view: how far each canary column moved from its (public) initial value, along the canary's direction.
        u = canary_directions(model, _reset_canaries(glob, init, d), data["canary_x"], data["canary_y"], d)
        moved = (glob["net.0.weight"][:, d:] - init["net.0.weight"][:, d:]).astype(np.float64)
        final_score = np.einsum("hm,hm->m", moved, u)
        phi = logit_confidence(model, glob, data["x"][1], data["y"][1])
        test = evaluate(_load(model, glob), data["test_x"], data["test_y"], k)
    return {
        "config": cfg.name, "index": index, "canary_in": canary_in, "final_score": final_score, "coordinator_score": coord_score,
        "candidate_in": cand_in, "phi": phi, "test_accuracy": float(test["accuracy"]),
        "epsilon_audit_site": ledgers.get("site-000"), "epsilon_max": max(ledgers.values()) if ledgers else None,
        "epsilon_by_site": ledgers, "noise_by_site": {kk: sorted(v) for kk, v in noise.items()}, "audit_site_records": int(len(ys[0])),
        "dp_path": _dp_gate()[2] if policy is not None else None, "seconds": time.perf_counter() - t0,
    }


def _coordinator_score(model: Any, glob: dict[str, np.ndarray], delta: dict[str, np.ndarray], init: dict[str, np.ndarray],
                       data: dict[str, Any]) -> np.ndarray:
    """One round of the coordinator's view: the audit site's delta on each canary column, along the canary's direction.

    The coordinator knows the model it sent (G) and the site's model at the end of the round (G + delta); the
    canary's gradient direction is averaged along that path (Simpson: G, G + delta/2, G + delta), since ten local
    epochs move the model too far for the direction at G alone (measured: separation 0.5-0.7 at G only vs 0.7-1.0).
    """
    d = data["real_features"]
    u = np.zeros((glob["net.0.weight"].shape[0], len(data["canary_y"])))
    for t, w in ((0.0, 1.0), (0.5, 2.0), (1.0, 1.0)):
        at = {kk: glob[kk] + t * delta[kk] for kk in glob}
        u += w * canary_directions(model, _reset_canaries(at, init, d), data["canary_x"], data["canary_y"], d)
    u /= np.maximum(np.linalg.norm(u, axis=0, keepdims=True), 1e-12)
    return np.einsum("hm,hm->m", delta["net.0.weight"][:, d:].astype(np.float64), u)


def _run_task(task: tuple[RunConfig, int]) -> dict[str, Any]:
    return run_federation(*task)


# ----------------------------------------------------------------------------------------- analysis


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.astype(int), scores))


def separation(scores: np.ndarray, included: np.ndarray) -> float | None:
    """(mean in - mean out) / sd out: the canaries' signal-to-noise (compare with the mu of a Gaussian mechanism); None when sd out is 0."""
    inc = np.asarray(included, bool)
    sd = float(scores[~inc].std())
    return float((scores[inc].mean() - scores[~inc].mean()) / sd) if sd > 0 else None


def auc_ci(auc: float, n_pos: int, n_neg: int) -> list[float]:
    """95% interval of an AUC (Hanley & McNeil 1982 standard error; assumes independent scores, so optimistic for LiRA's pooled targets)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg))
    return [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)]


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """TPR at the largest threshold whose FPR is <= `fpr` (no interpolation)."""
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels.astype(int), scores)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def lira(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Online LiRA with a global variance (Carlini et al. 2022, recommended below 64 shadows), every federation the target in turn.

    For target t and candidate i, the shadows are the other federations: phi_i where i was in and where
    it was out give Gaussians N(mu_in_i, s_in^2) and N(mu_out_i, s_out^2) (per-example means, variances
    pooled over examples); the score is the log likelihood ratio of the target's phi_i.
    """
    phi = np.stack([r["phi"] for r in runs])  # (F, n)
    member = np.stack([r["candidate_in"] for r in runs])
    f = len(runs)
    scores = np.zeros_like(phi)
    for t in range(f):
        sh = np.arange(f) != t
        p, mb = phi[sh], member[sh]
        cnt_in, cnt_out = mb.sum(0), (~mb).sum(0)
        mu_in = np.where(cnt_in > 0, (p * mb).sum(0) / np.maximum(cnt_in, 1), np.nan)
        mu_out = np.where(cnt_out > 0, (p * ~mb).sum(0) / np.maximum(cnt_out, 1), np.nan)
        s_in = np.sqrt(np.nanmean(np.where(mb, (p - mu_in) ** 2, np.nan))) + 1e-6
        s_out = np.sqrt(np.nanmean(np.where(~mb, (p - mu_out) ** 2, np.nan))) + 1e-6
        mu_in = np.where(np.isnan(mu_in), np.nanmean(mu_in), mu_in)
        mu_out = np.where(np.isnan(mu_out), np.nanmean(mu_out), mu_out)
        x = phi[t]
        scores[t] = (-0.5 * ((x - mu_in) / s_in) ** 2 - math.log(s_in)) - (-0.5 * ((x - mu_out) / s_out) ** 2 - math.log(s_out))
    s, lab = scores.ravel(), member.ravel()
    auc = roc_auc(s, lab)
    return {
        "shadows_per_target": f - 1, "targets": f, "scores": int(s.size), "members": int(lab.sum()),
        "auc": auc, "auc_95ci": auc_ci(auc, int(lab.sum()), int((~lab).sum())), "tpr_at_1pct_fpr": tpr_at_fpr(s, lab, 0.01), "tpr_at_0.1pct_fpr": tpr_at_fpr(s, lab, 0.001),
        "auc_first_target": roc_auc(scores[0], member[0]),
        "loss_attack_auc": roc_auc(phi.ravel(), lab),  # the plain confidence threshold (Yeom et al.), for comparison
    }


def gaussian_mu(eps: float, delta: float) -> float:
    """mu of the Gaussian mechanism that is exactly (eps, delta)-DP (Dong, Roth & Su: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2))."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(mu: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)) - delta

    return float(brentq(excess, 1e-3, 50.0))


def ideal_audit(eps: float, delta: float, m: int, sims: int, seed: int = 0) -> dict[str, Any]:
    """The bound this method gives a perfect attacker on a mechanism that is exactly (eps, delta)-DP (a Gaussian, mu-GDP), same m."""
    mu = gaussian_mu(eps, delta)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(sims):
        s_in = rng.random(m) < 0.5
        vals.append(audit(rng.normal(size=m) + mu * s_in, s_in, delta=delta)["epsilon_lb"])
    return {"mu": mu, "median_epsilon_lb": float(np.median(vals)), "p10_epsilon_lb": float(np.quantile(vals, 0.1)),
            "p90_epsilon_lb": float(np.quantile(vals, 0.9)), "simulations": sims}


def _range(vals: list[float]) -> list[float] | None:
    return [min(vals), max(vals)] if vals else None


def analyse(cfg: RunConfig, runs: list[dict[str, Any]], sims: int) -> dict[str, Any]:
    """The audit of the first (pre-designated) federation for both views, LiRA over all, the spread over repetitions."""
    runs = sorted(runs, key=lambda r: r["index"])
    s = cfg.setup
    first = runs[0]
    views = {}
    for view in ("final_score", "coordinator_score"):
        a = audit(first[view], first["canary_in"], delta=s.delta)
        reps = [audit(r[view], r["canary_in"], delta=s.delta)["epsilon_lb"] for r in runs]
        a["auc"] = roc_auc(first[view], first["canary_in"])
        a["separation"] = separation(first[view], first["canary_in"])
        a["repetitions"] = {"n": len(reps), "median": float(np.median(reps)), "min": float(np.min(reps)), "max": float(np.max(reps)),
                            "per_run": [round(x, 4) for x in reps], "note": "independent runs of the same procedure; their max is not a 95% bound"}
        views[view.removesuffix("_score")] = a
    eps_acc = [r["epsilon_audit_site"] for r in runs if r["epsilon_audit_site"] is not None]
    out: dict[str, Any] = {
        "name": cfg.name, "dp": cfg.epsilon_budget is not None, "mode": cfg.mode, "epsilon_budget": cfg.epsilon_budget, "delta": s.delta,
        "accountant": s.accountant if cfg.epsilon_budget is not None else None,
        "accounted_epsilon_audit_site": first["epsilon_audit_site"], "accounted_epsilon_max_site": first["epsilon_max"],
        "accounted_epsilon_audit_site_range": [min(eps_acc), max(eps_acc)] if eps_acc else None,
        "noise_multiplier_audit_site_range": _range([x for r in runs for x in r["noise_by_site"].get("site-000", [])]),
        "noise_multiplier_all_sites_range": _range([x for r in runs for v in r["noise_by_site"].values() for x in v]),
        "dp_code_path": first["dp_path"],
        "audit": views, "lira": lira(runs),
        "test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in runs])),
        "federations": len(runs), "federation_seconds_mean": float(np.mean([r["seconds"] for r in runs])),
        "audit_site_records_first": first["audit_site_records"],
    }
    m = s.canaries
    grid_r = [row["guesses"] for row in views["final"]["grid"]]
    out["method_ceiling_epsilon"] = max(epsilon_ceiling(m, r, s.delta, 0.05 / len(grid_r)) for r in grid_r)
    if cfg.epsilon_budget is not None and first["epsilon_audit_site"]:
        out["ideal_gaussian_audit"] = ideal_audit(first["epsilon_audit_site"], s.delta, m, sims)
    return out


# ----------------------------------------------------------------------------------------- main


def _print_table(results: list[dict[str, Any]], wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fedseek privacy audit: empirical epsilon lower bounds (95%) vs accounted epsilon, LiRA (wall {wall / 60:.1f} min)")
    cols = ("config", "accounted eps", "LB final model", "LB coordinator", "LB perfect attack", f"guesses / correct (m={results[0]['audit']['final']['canaries']})", "canary sep.",
            "LB spread (runs)", "LiRA AUC [95% CI]", "TPR @1% FPR", "test acc")
    for col in cols:
        t.add_column(col, justify="right")
    for r in results:
        fa, co, li = r["audit"]["final"], r["audit"]["coordinator"], r["lira"]
        acc = r["accounted_epsilon_audit_site"]
        ideal = r.get("ideal_gaussian_audit")
        spread = co["repetitions"]
        t.add_row(r["name"], f"{acc:.2f}" if acc is not None else "none (no DP)", f"{fa['epsilon_lb']:.2f}", f"{co['epsilon_lb']:.2f}",
                  f"{ideal['median_epsilon_lb']:.2f}" if ideal else f"cap {r['method_ceiling_epsilon']:.2f}",
                  f"{fa['guesses']}/{fa['correct']} | {co['guesses']}/{co['correct']}", " | ".join("exact" if v is None else f"{v:.2f}" for v in (fa["separation"], co["separation"])),
                  f"{spread['min']:.2f}-{spread['median']:.2f}-{spread['max']:.2f}",
                  f"{li['auc']:.3f} [{li['auc_95ci'][0]:.3f}, {li['auc_95ci'][1]:.3f}]", f"{li['tpr_at_1pct_fpr']:.3f}", f"{r['test_accuracy_mean']:.3f}")
    con = Console(width=220)
    con.print(t)
    con.print("LB: largest eps for which 'this run is (eps, delta)-DP' is rejected at 95% (Steinke et al. 2023, Bonferroni over the guess grid); "
              "final model = global model only; coordinator = the audit site's per-round deltas. LB perfect attack: median LB of a perfect "
              "attacker on a Gaussian mechanism that is exactly (accounted eps, delta)-DP, same canaries (the method's reach); cap: all guesses "
              "right. Pairs are final | coordinator; canary sep. = (mean in - mean out) / sd out; LB spread: min-median-max of the coordinator "
              "LB over the configuration's independent runs (not itself a 95% bound). LiRA: online, global variance, every run the target in "
              "turn against the others as shadows; TPR at 1% FPR of a random guess is 0.01.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): fewer canaries, rounds and shadows; results go to the temp dir")
    ap.add_argument("--canaries", type=int, default=None, help="canaries at the audit site (default 500; more = a tighter reach, slower)")
    ap.add_argument("--budgets", default="3,8", help="epsilon budgets of the DP configurations (comma-separated)")
    ap.add_argument("--federations", type=int, default=None, help="federations per configuration (1 target + shadows)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--distributed", action="store_true", help="also audit privacy.mode distributed at each budget (the sum of the "
                    "four sites' noise shares; the coordinator view is then each round's aggregate)")
    ap.add_argument("--only", default=None, help="run only these configurations (comma-separated names) and replace them in --out")
    args = ap.parse_args()
    setup = Setup()
    if args.quick:
        setup = replace(setup, canaries=300, rounds=3, local_epochs=5, hidden=(64,), federations=5)
    if args.canaries:
        setup = replace(setup, canaries=args.canaries)
    if args.federations:
        setup = replace(setup, federations=args.federations)
    out_path = args.out or (QUICK_DIR / "privacy_audit.quick.json" if args.quick else RESULTS / "privacy_audit.json")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    configs = [RunConfig(f"dp_eps{b:g}", b, setup) for b in budgets] + [RunConfig("no_dp", None, setup)]
    if args.distributed:
        configs += [RunConfig(f"dp_eps{b:g}_distributed", b, setup, mode="distributed") for b in budgets]
    if args.only:
        configs = [c for c in configs if c.name in args.only.split(",")]
    tasks = [(c, i) for c in configs for i in range(setup.federations)]
    t0 = time.time()
    log(f"privacy_audit: {len(configs)} configurations x {setup.federations} federations on {args.workers} worker(s)")
    done: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(args.workers))
            results_iter: Iterator[dict[str, Any]] = pool.imap_unordered(_run_task, tasks)
        else:
            results_iter = map(_run_task, tasks)
        for res in results_iter:
            done[res["config"]].append(res)
            log(f"  {res['config']} #{res['index']}: {res['seconds']:.1f} s, eps {res['epsilon_audit_site']}, acc {res['test_accuracy']:.3f}")
    train_wall = time.time() - t0
    sims = 10 if args.quick else 40
    results = [analyse(c, done[c.name], sims) for c in configs]
    if args.only and out_path.exists():  # keep the configurations not rerun from the earlier measurement
        import json

        earlier = json.loads(out_path.read_text())["results"]
        rerun = {r["name"] for r in results}
        results = [r for r in earlier if r["name"] not in rerun] + results
    wall = time.time() - t0
    _print_table(results, wall)
    write_json(out_path, {
        "benchmark": "privacy_audit", "quick": args.quick, "machine": environment(), "setup": asdict(setup),
        "wall_seconds": wall, "training_wall_seconds": train_wall, "workers": args.workers,
        "method": {
            "audit": "one-run audit, Steinke, Nasr & Jagielski 2023 (NeurIPS): m canaries each in w.p. 1/2 (secrets), all at site-000; "
                     "white-box Dirac-style input canaries (own input column each); score = column movement along the canary's gradient "
                     "direction; guesses on a fixed 6-point (k+, k-) grid at level 0.05/6 each (Bonferroni); bound in benchmarks/_audit_bound.py",
            "views": {"final": "final global model only", "coordinator": "site-000's per-round deltas (what its ledger's epsilon covers); "
                      "distributed configurations: each round's aggregate step, all the coordinator unmasks"},
            "lira": "online LiRA (Carlini et al. 2022), global variance, logit-scaled confidence of the final global model; each of the "
                    "configuration's federations is the target in turn, the others are its shadows (random in/out of site-001's candidates)",
            "dp_path": "per round and site: site_privacy.training_gate (or a reproduction of site._dp_round) -> train_local(privacy=DPRound); FedAvg of deltas",
        },
        "how_to_read": [
            "epsilon_lb: with 95% confidence the run is NOT (epsilon_lb, delta)-DP. It can falsify an accounting claim (epsilon_lb > accounted), never confirm one.",
            "epsilon_lb far below the accounted epsilon is expected and does not mean the accounting is loose by that factor: ideal_gaussian_audit is what a "
            "perfect attacker gets with the same number of canaries against a mechanism that is exactly (accounted epsilon, delta)-DP; the audit sees round "
            "deltas or one final model, not every DP-SGD step the accountant allows for; the RDP conversion is an upper bound.",
            "no_dp: the canaries are identified exactly (up to method_ceiling_epsilon, the most m canaries can certify) and LiRA AUC is clearly above 0.5: the "
            "attacks work, and DP is what stops them.",
        ],
        "results": results,
    })
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
