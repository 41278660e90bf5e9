"""The one-run audit bound (Steinke, Nasr & Jagielski 2023) used by benchmarks/privacy_audit.py: fast checks, no training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _audit_bound import audit, epsilon_lower_bound, guesses, p_value  # noqa: E402


def test_all_correct_matches_closed_form_without_delta():
    # delta = 0, v = r: p-value = q^r with q = e^eps / (1 + e^eps), so the bound is logit(p^(1/r)).
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)


def test_all_correct_with_many_guesses_is_large():
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5, 0.05) > 5.5
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05) > 3.0


def test_chance_level_gives_zero():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(1000, 1000, 520, 1e-5, 0.05) == 0.0  # within sampling noise of a coin
    assert epsilon_lower_bound(1000, 0, 0, 1e-5, 0.05) == 0.0


def test_random_guessing_gives_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        included = rng.random(500) < 0.5
        bounds.append(audit(rng.normal(size=500), included, delta=1e-5)["epsilon_lb"])
    # Each bound is wrong (> 0) with probability <= 5%; random scores stay near zero.
    assert np.median(bounds) == 0.0
    assert max(bounds) < 0.6


def test_monotone_in_correct_guesses_and_confidence():
    eps = [epsilon_lower_bound(500, 200, v, 1e-5, 0.05) for v in range(100, 201, 5)]
    assert all(b >= a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] > eps[len(eps) // 2] > 0
    assert epsilon_lower_bound(500, 200, 170, 1e-5, 0.01) < epsilon_lower_bound(500, 200, 170, 1e-5, 0.05)


def test_delta_only_weakens_the_bound():
    assert epsilon_lower_bound(1000, 200, 170, 1e-3, 0.05) < epsilon_lower_bound(1000, 200, 170, 0.0, 0.05)


def test_p_value_is_a_valid_tail_under_randomized_response():
    # An eps-DP randomized response on each canary reaches exactly accuracy e^eps / (1 + e^eps): the observed
    # p-value at that eps must not be small more often than its level says.
    rng = np.random.default_rng(1)
    eps, m = 1.0, 400
    acc = 1 / (1 + math.exp(-eps))
    small = sum(p_value(m, m, int((rng.random(m) < acc).sum()), eps, 0.0) < 0.05 for _ in range(400))
    assert small / 400 <= 0.08


def test_guesses_counts_top_and_bottom():
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8])
    included = np.array([False, True, False, True, True])
    assert guesses(scores, included, 2, 2) == (4, 3)  # top 2 = {0.9, 0.8} right; bottom 2 = {0.1 right, 0.2 wrong}
    assert guesses(scores, included, 0, 1) == (1, 1)


def test_audit_reports_a_bonferroni_level():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    out = audit(rng.normal(size=1000) + 3.0 * included, included, delta=1e-5)
    assert out["per_test_level"] == pytest.approx(0.05 / out["bonferroni_tests"])
    assert 2.0 < out["epsilon_lb"] < 6.0
    assert out["correct"] <= out["guesses"]
