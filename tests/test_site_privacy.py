"""Site-side DP mechanics: secret (CSPRNG) batch selection, the exact mechanism charged, the declared reply fields, the holdout split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedseek.config import PrivacySpec
from fedseek.data.holdout import holdout_key, holdout_mask
from fedseek.privacy import DPRound, PrivacyLedger, plan_round
from fedseek.privacy.sampling import SecurePoissonSampler, plan_sampling
from fedseek.train.local import train_local
from fedseek.train.models import build_model
from fedseek.wire import release
from fedseek.wire.records import EvalMetrics, RefusalMetrics, StatsReply, TrainMetrics


def _data(n: int, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _policy(**over) -> PrivacySpec:
    return PrivacySpec(**{"epsilon_budget": 1e6, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0, **over})


@pytest.mark.parametrize("k", [2, 92, 93, 94, 99, 105, 111])
def test_ledger_records_exactly_the_mechanism_opacus_ran(tmp_path, k):
    """k = ceil(n/B) batches at q = 1/k: Opacus' own conversion took int(1/q) = k-1 at k = 93 (ledger q, steps wrong)."""
    batch = 4
    n = k * batch - 1  # ceil(n/B) = k
    x, y = _data(n)
    q, steps = plan_round(n, batch, 1)
    assert (q, steps) == (1.0 / k, k)
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=1e6, site="s")
    dp = DPRound(_policy(), ledger, 1.0, run_id="r", server_round=1)
    dp.charge(q, steps)
    model = build_model("mlp", (4,), 2, [4])
    res = train_local(model, x, y, num_classes=2, epochs=1, lr=0.1, batch_size=batch, privacy=dp)
    opacus_hist = list(dp.engine.accountant.history)
    assert sum(int(s) for _, _, s in opacus_hist) == k == res.steps
    assert all(abs(float(qq) - 1.0 / k) < 1e-15 for _, qq, _ in opacus_hist)
    assert ledger.history == [(1.0, 1.0 / k, k)]  # charged before training, nothing added after: exact
    assert PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=1e6).history == [(1.0, 1.0 / k, k)]


def test_dp_batches_do_not_follow_the_coordinator_seed(tmp_path):
    """The coordinator knows the run seed: a DP loader built from a seeded loader must still draw unpredictable batches."""
    n, batch, seed = 400, 20, 1234
    x, y = _data(n)
    ds = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
        ledger = PrivacyLedger(tmp_path / f"l{len(runs)}", accountant="rdp", delta=1e-5, epsilon_budget=1e6)
        dp = DPRound(_policy(), ledger, 1.0, run_id="r", server_round=1)
        model = build_model("mlp", (4,), 2, [4])
        _, _, _, dp_loader = dp.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), loader)
        assert isinstance(dp_loader.batch_sampler, SecurePoissonSampler)
        runs.append([set(b) for b in dp_loader.batch_sampler])
    # The attacker replays Opacus' seeded Poisson sampler with the seed it sent.
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    q, k = plan_sampling(n, batch)
    guess = [set(b) for b in UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=k,
                                                           generator=torch.Generator().manual_seed(seed))]
    def overlap(a: list[set[int]], b: list[set[int]]) -> float:
        return sum(len(s & t) for s, t in zip(a, b, strict=True)) / max(1, sum(len(s) for s in a))
    assert overlap(runs[0], runs[1]) < 0.2  # two rounds with the same seed: independent batches (~q = 0.05 expected)
    assert overlap(guess, runs[0]) < 0.2 and overlap(guess, runs[1]) < 0.2


def test_sampler_rate_matches_plan():
    sampler = SecurePoissonSampler(2000, 0.05, 200)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 200 and abs(np.mean(sizes) - 100) < 5  # 200 batches of Binomial(2000, 0.05): mean within ~7 se


def test_every_reply_field_has_a_declared_privacy_status():
    """Adding a field to a reply record without declaring what it reveals fails here."""
    assert release.undeclared(set(TrainMetrics.model_fields), release.TRAIN_REPLY) == set()
    assert release.undeclared(set(RefusalMetrics.model_fields) | {"reason"}, release.REFUSAL_REPLY) == set()
    assert release.undeclared(set(EvalMetrics.model_fields), release.EVAL_REPLY) == set()
    assert release.undeclared(set(StatsReply.model_fields), release.STATS_REPLY) == set()
    assert release.TRAIN_REPLY["train_loss"][0] == "non-dp"
    assert {s for s, _ in release.EVAL_REPLY.values()} <= {"dp", "public"}  # a DP site's evaluation reply has no non-DP field


def test_holdout_split_is_a_fixed_function_of_each_record(tmp_path):
    x, y = _data(500)
    key = holdout_key(tmp_path)
    assert (tmp_path / "holdout.key").stat().st_mode & 0o777 == 0o600 and holdout_key(tmp_path) == key  # drawn once, kept
    held = holdout_mask(x, y, 0.2, key)
    assert 60 < held.sum() < 140  # ~100 of 500
    # Adding records never moves an existing record across the line (parallel composition needs a per-record rule).
    x2, y2 = np.concatenate([x, _data(50)[0]]), np.concatenate([y, _data(50)[1]])
    assert np.array_equal(holdout_mask(x2, y2, 0.2, key)[:500], held)
    assert not np.array_equal(holdout_mask(x, y, 0.2, holdout_key(tmp_path / "other")), held)  # another site's key, another split
