"""Offline built-in tasks (no download ever): sklearn's breast cancer and digits, synthetic bank fraud.

Every task returns `(train, test)` ArrayDatasets from a stratified split seeded by `seed`,
so the same seed gives byte-identical data in every process of a simulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedseek.data.arrays import ArrayDataset
from fedseek.names import DATASETS

#: Column names of the bank_fraud feature matrix, in order (merchant categories are one-hot).
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery",
    "fuel",
    "restaurant",
    "retail",
    "online_retail",
    "travel",
    "electronics",
    "gaming_crypto",
)
BANK_FRAUD_FEATURES: tuple[str, ...] = (
    "log_amount",
    "log_amount_vs_customer_typical",
    "hour_sin",
    "hour_cos",
    "log_distance_from_home_km",
    "txns_last_24h",
    "log_account_age_days",
    "card_present",
    "foreign",
) + tuple(f"merchant_{c}" for c in MERCHANT_CATEGORIES)


def _check_fraction(test_fraction: float) -> None:
    """Reject a test fraction that would leave one side empty."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def stratified_split(
    n: int, strata: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, test_idx) with each stratum split in proportion; seeded, so reproducible.

    Falls back to a plain shuffled split only for strata too small to split (fewer than 2 rows).
    """
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    strata = np.asarray(strata).reshape(-1)
    if strata.shape[0] != n:
        raise ValueError(f"strata has {strata.shape[0]} entries, expected {n}")
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    leftovers: list[np.ndarray] = []
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        if members.size < 2:
            leftovers.append(members)
            continue
        n_test = int(round(members.size * test_fraction))
        n_test = min(max(n_test, 1), members.size - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    if leftovers:
        rest = rng.permutation(np.concatenate(leftovers))
        n_test = int(round(rest.size * test_fraction))
        test_parts.append(rest[:n_test])
        train_parts.append(rest[n_test:])
    train_idx = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    return train_idx, test_idx


def standardize_with(
    train_x: np.ndarray, *others: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Scale every array by the TRAIN array's per-feature mean/std (constant features: std 1)."""
    flat = train_x.reshape(train_x.shape[0], -1).astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std[std < 1e-12] = 1.0
    out = []
    for arr in (train_x, *others):
        f = (arr.reshape(arr.shape[0], -1).astype(np.float64) - mean) / std
        out.append(f.reshape(arr.shape).astype(np.float32))
    return tuple(out)


def breast_cancer(seed: int, test_fraction: float = 0.25) -> tuple[ArrayDataset, ArrayDataset]:
    """Wisconsin breast cancer (569 x 30, 2 classes), standardized with the train split's mean/std.

    Using the pooled train split's statistics is a simulation convenience: real hospital sites
    would standardize with published (public) statistics agreed beforehand, since computing
    pooled statistics would itself require sharing data.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = stratified_split(len(y), y, test_fraction, seed)
    x_tr, x_te = standardize_with(x[tr], x[te])
    classes = [str(c) for c in bunch.target_names]
    return (
        ArrayDataset(x_tr, y[tr], 2, "breast_cancer/train", classes=classes),
        ArrayDataset(x_te, y[te], 2, "breast_cancer/test", classes=classes),
    )


def digits(
    seed: int, test_fraction: float = 0.25, as_images: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """sklearn 8x8 handwritten digits (1797 images, 10 classes), pixels scaled to [0, 1].

    `as_images=True` gives x of shape (N, 1, 8, 8) for the CNN, else (N, 64) for the MLP.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    if as_images:
        x = x.reshape(-1, 1, 8, 8)
    tr, te = stratified_split(len(y), y, test_fraction, seed)
    classes = [str(c) for c in bunch.target_names]
    return (
        ArrayDataset(x[tr], y[tr], 10, "digits/train", classes=classes),
        ArrayDataset(x[te], y[te], 10, "digits/test", classes=classes),
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _calibrate_intercept(score: np.ndarray, target_rate: float) -> float:
    """Intercept b with mean(sigmoid(b + score)) == target_rate (bisection; mean is monotone in b)."""
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + score).mean() < target_rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# Population-level constants of the fraud generator (per-bank parameters vary around them).
_BASE_CATEGORY_MIX = np.array([0.26, 0.12, 0.16, 0.16, 0.14, 0.05, 0.07, 0.04])
_CATEGORY_CARD_PRESENT = np.array([0.97, 0.95, 0.9, 0.85, 0.02, 0.35, 0.6, 0.05])
_CATEGORY_AMOUNT_SHIFT = np.array([-0.3, 0.0, -0.2, 0.2, 0.1, 1.2, 1.0, 0.3])  # log scale
_CATEGORY_RISK = np.array([-0.8, -0.4, -0.6, 0.0, 0.4, 0.3, 0.9, 1.3])


def _simulate_bank(
    rng: np.random.Generator, n: int, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Generate n transactions (features, fraud score before the intercept) for one bank."""
    cat = rng.choice(len(MERCHANT_CATEGORIES), size=n, p=params["category_mix"])
    # Each transaction belongs to a customer with a typical (log) spend; the amount deviates from it.
    customer_mu = params["amount_mu"] + rng.normal(0.0, 0.6, n)
    log_amount = customer_mu + _CATEGORY_AMOUNT_SHIFT[cat] + rng.normal(0.0, 0.7, n)
    amount_vs_typical = log_amount - customer_mu
    # Hour of day: mostly daytime activity plus a uniform background.
    daytime = rng.random(n) < 0.88
    hour = np.where(daytime, rng.normal(14.0, 3.5, n), rng.uniform(0.0, 24.0, n)) % 24.0
    card_present = (
        rng.random(n) < np.clip(_CATEGORY_CARD_PRESENT[cat] * params["card_present_scale"], 0, 1)
    ).astype(np.float64)
    foreign_p = np.clip(params["foreign_share"] * np.where(cat == 5, 4.0, 1.0), 0.0, 0.9)
    foreign = (rng.random(n) < foreign_p).astype(np.float64)
    log_distance = (
        params["distance_mu"] + rng.normal(0.0, 0.9, n) + foreign * rng.normal(4.0, 0.6, n)
    )
    txns_24h = rng.poisson(params["velocity"], n).astype(np.float64)
    account_age = 1.0 + rng.exponential(params["account_age_days"], n)
    log_age = np.log(account_age)

    onehot = np.eye(len(MERCHANT_CATEGORIES))[cat]
    x = np.column_stack(
        [
            log_amount,
            amount_vs_typical,
            np.sin(2 * np.pi * hour / 24.0),
            np.cos(2 * np.pi * hour / 24.0),
            log_distance,
            txns_24h,
            log_age,
            card_present,
            foreign,
            onehot,
        ]
    )

    # Fraud propensity: additive risk factors plus non-linear terms (hinges, interactions)
    # that a linear model only partly captures and an MLP can learn.
    w = params["weights"]
    night = np.exp(-(((hour - 3.0 + 12.0) % 24.0 - 12.0) ** 2) / (2 * 2.5**2))  # bump at 03:00
    cnp = 1.0 - card_present
    score = (
        w[0] * night
        + w[1] * np.logaddexp(0.0, 2.0 * (amount_vs_typical - 0.6))  # unusually large for them
        + w[2] * cnp
        + w[3] * foreign
        + w[4] * cnp * foreign
        + _CATEGORY_RISK[cat] * w[5]
        + w[6] * np.maximum(txns_24h - params["velocity"] - 1.0, 0.0)  # burst of activity
        + w[7] * np.maximum(4.5 - log_age, 0.0)  # young accounts
        + w[8] * np.maximum(log_distance - params["distance_mu"] - 1.5, 0.0) * (1 - foreign)
    )
    return x, score


def _bank_params(seed: int, num_banks: int, fraud_rate: float, drift: float) -> list[dict[str, Any]]:
    """Each bank's drifted parameters, from their own stream (so they do not change with rows_per_bank)."""
    prng = np.random.default_rng([seed, 0])
    base_weights = np.array([1.6, 1.2, 1.3, 1.0, 1.2, 1.0, 0.6, 0.45, 0.5])
    rate_mult = np.exp(drift * prng.normal(0.0, 0.5, num_banks))
    bank_rates = np.clip(fraud_rate * rate_mult / rate_mult.mean(), 1e-4, 0.45)
    banks = []
    for b in range(num_banks):
        mix = _BASE_CATEGORY_MIX * np.exp(drift * prng.normal(0.0, 0.6, len(_BASE_CATEGORY_MIX)))
        banks.append(
            {
                "amount_mu": np.log(40.0) + drift * prng.normal(0.0, 0.6),
                "foreign_share": float(np.clip(0.05 * np.exp(drift * prng.normal(0, 0.8)), 0.003, 0.3)),
                "card_present_scale": float(np.clip(1.0 + drift * prng.normal(0, 0.2), 0.5, 1.2)),
                "category_mix": mix / mix.sum(),
                "distance_mu": np.log(6.0) + drift * prng.normal(0.0, 0.5),
                "velocity": 2.5 * float(np.exp(drift * prng.normal(0.0, 0.4))),
                "account_age_days": 1200.0 * float(np.exp(drift * prng.normal(0.0, 0.5))),
                "weights": base_weights * np.exp(drift * prng.normal(0.0, 0.25, base_weights.size)),
                "rate": float(bank_rates[b]),
            }
        )

    return banks


def bank_fraud(
    seed: int,
    num_banks: int = 10,
    rows_per_bank: int = 2000,
    fraud_rate: float = 0.015,
    drift: float = 0.5,
    test_fraction: float = 0.25,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Synthetic card transactions from `num_banks` banks (~`fraud_rate` fraud, 17 features, 2 classes).

    Features (see BANK_FRAUD_FEATURES): log-normal amount and its deviation from the customer's
    typical spend, hour of day as sin/cos, distance from home, transactions in the last 24h,
    account age, card-present and foreign flags, merchant category one-hot. Fraud depends
    non-linearly (hinges, an interaction, a night-time bump) but learnably on them.
    Per-bank drift (scaled by `drift`; 0 = identical banks): amount scale, foreign share,
    card-present share, merchant mix, account ages, activity level, distance scale, the
    weights of the fraud pattern, and the fraud rate (varied around `fraud_rate`, whose mean
    over banks stays `fraud_rate`). `groups` on both returned datasets holds each row's bank
    index (0..num_banks-1); the split is stratified by (bank, label). Features are standardized
    with the pooled train split's statistics (a simulation convenience, as for breast_cancer).
    """
    _check_fraction(test_fraction)
    if num_banks < 1 or rows_per_bank < 1:
        raise ValueError("num_banks and rows_per_bank must be >= 1")
    if not 0.0 < fraud_rate < 0.5:
        raise ValueError(f"fraud_rate must be in (0, 0.5), got {fraud_rate}")
    if drift < 0:
        raise ValueError(f"drift must be >= 0, got {drift}")

    banks = _bank_params(seed, num_banks, fraud_rate, drift)
    xs, ys, gs = [], [], []
    for b, params in enumerate(banks):
        rng = np.random.default_rng([seed, 1, b])
        x, score = _simulate_bank(rng, rows_per_bank, params)
        p = _sigmoid(_calibrate_intercept(score, params["rate"]) + score)
        xs.append(x)
        ys.append((rng.random(rows_per_bank) < p).astype(np.int64))
        gs.append(np.full(rows_per_bank, b, dtype=np.int64))
    x_all = np.concatenate(xs)
    y_all = np.concatenate(ys)
    g_all = np.concatenate(gs)

    tr, te = stratified_split(len(y_all), g_all * 2 + y_all, test_fraction, seed)
    x_tr, x_te = standardize_with(x_all[tr], x_all[te])
    classes = ["legit", "fraud"]
    return (
        ArrayDataset(x_tr, y_all[tr], 2, "bank_fraud/train", groups=g_all[tr], classes=classes),
        ArrayDataset(x_te, y_all[te], 2, "bank_fraud/test", groups=g_all[te], classes=classes),
    )


def load_builtin(name: str, seed: int, **kwargs: Any) -> tuple[ArrayDataset, ArrayDataset]:
    """Built-in task by name ("breast_cancer" | "digits" | "bank_fraud"), kwargs passed through."""
    loaders: dict[str, Callable[..., tuple[ArrayDataset, ArrayDataset]]] = {
        "breast_cancer": breast_cancer, "digits": digits, "bank_fraud": bank_fraud}
    if name not in loaders:
        raise ValueError(
            f"unknown built-in dataset {name!r}; allowed: {', '.join(DATASETS)}"
        )
    return loaders[name](seed, **kwargs)
