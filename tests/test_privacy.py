"""Record-level DP at a site: the persistent ledger, restarts, the hard budget, and clipping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseek.config import PrivacySpec
from fedseek.privacy import (
    BudgetExceeded,
    DPRound,
    PrivacyLedger,
    epsilon_for,
    noise_for_round,
    plan_round,
)
from fedseek.train.local import TrainResult, train_local
from fedseek.train.models import build_model


def _data(n: int = 60, d: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def _dp_round(
    ledger: PrivacyLedger, policy: PrivacySpec, x: np.ndarray, y: np.ndarray, rnd: int, noise: float,
    epochs: int = 1, batch: int = 16, model: torch.nn.Module | None = None,
) -> TrainResult:
    model = model or build_model("mlp", (x.shape[1],), 2, seed=rnd)
    q, steps = plan_round(len(y), batch, epochs)
    ledger.check(noise, q, steps, run_id="t", server_round=rnd)
    dp = DPRound(policy, ledger, noise, run_id="t", server_round=rnd)
    return train_local(model, x, y, num_classes=2, epochs=epochs, lr=0.1, batch_size=batch, seed=rnd, privacy=dp)


@pytest.mark.parametrize("accountant, rounds", [("rdp", 4), ("prv", 2)])  # PRV: ~1 s per distinct history
def test_ledger_matches_independent_accountant(tmp_path: Path, accountant: str, rounds: int) -> None:
    """After R rounds the ledger's epsilon equals one accountant stepped over the same steps."""
    from opacus.accountants import create_accountant

    x, y = _data()
    policy = PrivacySpec(noise_multiplier=1.1, accountant=accountant, grad_sample_mode="ghost")
    ledger = PrivacyLedger(tmp_path, accountant=accountant, delta=1e-5, epsilon_budget=100, site="s")
    total_steps = 0
    for rnd in range(1, rounds + 1):
        res = _dp_round(ledger, policy, x, y, rnd, 1.1, epochs=2)
        total_steps += int(res.dp["dp_steps"])
    q, _ = plan_round(len(y), 16, 2)
    independent = create_accountant(accountant)
    for _ in range(total_steps):
        independent.step(noise_multiplier=1.1, sample_rate=q)
    assert total_steps == rounds * 2 * 4
    assert ledger.epsilon() == pytest.approx(independent.get_epsilon(delta=1e-5), abs=1e-6)
    # A fresh ledger object reading the file (a restarted site) sees the same epsilon.
    again = PrivacyLedger(tmp_path, accountant=accountant, delta=1e-5, epsilon_budget=100)
    assert again.epsilon() == pytest.approx(ledger.epsilon(), abs=1e-12)
    assert json.loads((tmp_path / "privacy_ledger.json").read_text())["epsilon"] == pytest.approx(ledger.epsilon())


def test_rdp_cross_checked_against_google_dp_accounting() -> None:
    """Opacus' RDP (what the ledger uses) agrees with Google's dp-accounting on the same history."""
    dp_accounting = pytest.importorskip("dp_accounting")
    q, sigma, steps = 0.25, 1.1, 40
    ours = epsilon_for([(sigma, q, steps)], 1e-5, "rdp")
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    theirs = acc.get_epsilon(1e-5)
    assert ours == pytest.approx(theirs, rel=2e-2)


def test_prv_cross_checked_against_google_pld_and_tighter_than_rdp() -> None:
    """Opacus' PRV (the tighter accountant) agrees with dp-accounting's PLD, an independent implementation, within PRV's
    own error bound (eps_error 0.01 plus discretisation), and needs less noise than RDP for the same budget."""
    dp_accounting = pytest.importorskip("dp_accounting")
    for q, sigma, steps in ((1.0, 11.5, 60), (0.2, 3.8, 150)):
        prv = epsilon_for([(sigma, q, steps)], 1e-5, "prv")
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        assert prv == pytest.approx(acc.get_epsilon(1e-5), abs=0.02)
        assert prv < 0.95 * epsilon_for([(sigma, q, steps)], 1e-5, "rdp")


def test_distributed_charges_cross_checked_against_google_dp_accounting(tmp_path: Path) -> None:
    """distributed DP: the ledger's epsilon (the secure sum's noise, one full-batch step per round) and its local floor
    (each charge at the site's own share) equal dp-accounting's RDP of a Gaussian mechanism composed over the rounds."""
    dp_accounting = pytest.importorskip("dp_accounting")
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=1e6)
    sigma, honest, rounds = 11.57, 13, 60
    for r in range(rounds):
        ledger.charge(sigma, 1.0, 1, run_id="r", server_round=r + 1, local_noise_multiplier=sigma / honest ** 0.5)

    def google(s: float) -> float:
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(s), rounds)
        return float(acc.get_epsilon(1e-5))

    assert ledger.epsilon() == pytest.approx(google(sigma), rel=2e-2)
    assert ledger.local_floor_epsilon() == pytest.approx(google(sigma / honest ** 0.5), rel=2e-2)
    assert ledger.local_floor_epsilon() > 4 * ledger.epsilon()  # 13.5 against 3.0
    again = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=1e6)  # the share survives a reload
    assert again.local_floor_epsilon() == pytest.approx(ledger.local_floor_epsilon())


def test_fresh_engine_each_round_would_reset_but_ledger_does_not(tmp_path: Path) -> None:
    """The trap we avoid: Opacus' own per-round accountant only knows its round."""
    x, y = _data()
    policy = PrivacySpec(noise_multiplier=1.0, grad_sample_mode="hooks")
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=100)
    per_round = []
    for rnd in (1, 2, 3):
        res = _dp_round(ledger, policy, x, y, rnd, 1.0)
        per_round.append(res.dp["epsilon"])
    one_round = epsilon_for([(1.0, 0.25, 4)], 1e-5, "rdp")
    assert per_round[0] == pytest.approx(one_round)
    assert per_round[2] > per_round[1] > per_round[0]


def test_budget_refusal_is_exact_and_persisted(tmp_path: Path) -> None:
    x, y = _data()
    policy = PrivacySpec(noise_multiplier=1.5, epsilon_budget=4.0)
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=4.0, site="s")
    done = 0
    with pytest.raises(BudgetExceeded, match="refuses round"):
        for rnd in range(1, 50):
            _dp_round(ledger, policy, x, y, rnd, 1.5)
            done += 1
    assert done >= 1
    assert ledger.epsilon() <= 4.0
    # the refused round would have gone over; nothing of it was spent
    q, steps = plan_round(len(y), 16, 1)
    assert ledger.projected_epsilon(1.5, q, steps) > 4.0
    saved = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert len(saved["refusals"]) == 1 and len(saved["rounds"]) == done


@pytest.mark.parametrize("q, steps, history", [(1.0, 60, ()), (0.2, 150, ()), (0.2, 20, ((8.0, 1.0, 10),))])
def test_prv_noise_is_the_smallest_that_fits_and_below_rdps(q: float, steps: int, history: tuple) -> None:
    """The PRV search starts from RDP's answer: it must still land on the smallest noise that fits (to its 0.2% step)."""
    from fedseek.privacy.accounting import epsilon_for, fit_noise

    prv, rdp = fit_noise(history, q, steps, 3.0, 1e-5, "prv"), fit_noise(history, q, steps, 3.0, 1e-5, "rdp")
    assert prv is not None and rdp is not None and prv < rdp
    assert epsilon_for([*history, (prv, q, steps)], 1e-5, "prv") <= 3.0 < epsilon_for([*history, (prv * 0.995, q, steps)], 1e-5, "prv")


def test_fit_budget_calibration_spends_at_most_budget(tmp_path: Path) -> None:
    x, y = _data()
    rounds = 5
    policy = PrivacySpec(epsilon_budget=2.0, planning_rounds=rounds)  # no noise given: fit the site's own horizon
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=2.0)
    q, steps = plan_round(len(y), 16, 1)
    noises = []
    for rnd in range(1, rounds + 1):
        noises.append(noise_for_round(policy, ledger, q, steps))
        _dp_round(ledger, policy, x, y, rnd, noises[-1])
    assert 1.9 <= ledger.epsilon() <= 2.0  # uses the budget, never more
    assert len(set(noises)) == 1  # calibrated once over the horizon, kept
    # Past its horizon the site only fits what is left of the budget: far more noise, never past the budget.
    try:
        extra = noise_for_round(policy, ledger, q, steps)
    except BudgetExceeded:
        return  # nothing left that any noise can fit: refusing is also within the guarantee
    assert extra > 3 * noises[0]
    assert ledger.check(extra, q, steps) <= 2.0 + 1e-9


def test_changed_accountant_or_corrupt_ledger_refuses(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=3)
    ledger.record(1.0, 0.1, 10, run_id="r", server_round=1)
    with pytest.raises(RuntimeError, match="not comparable"):
        PrivacyLedger(tmp_path, accountant="prv", delta=1e-5, epsilon_budget=3)
    (tmp_path / "privacy_ledger.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=3)


_WORKER = r"""
import sys, time, numpy as np
from fedseek.config import PrivacySpec
from fedseek.train.models import build_model
from fedseek.train.local import train_local
from fedseek.privacy import DPRound, PrivacyLedger, plan_round
state, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.normal(size=(60, 30)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int64)
pol = PrivacySpec(noise_multiplier=1.0, grad_sample_mode="ghost")
for rnd in range(first, last + 1):
    led = PrivacyLedger(state, accountant="rdp", delta=1e-5, epsilon_budget=100, site="h")
    q, steps = plan_round(60, 16, 1)
    led.check(1.0, q, steps, run_id="w", server_round=rnd)
    train_local(build_model("mlp", (30,), 2), x, y, num_classes=2, epochs=1, lr=0.1, batch_size=16,
                privacy=DPRound(pol, led, 1.0, run_id="w", server_round=rnd))
    print("done", rnd, flush=True)
time.sleep(60)
"""


@pytest.mark.slow  # two fresh interpreters importing torch + Opacus, one killed with SIGKILL
def test_site_killed_between_rounds_continues_epsilon(tmp_path: Path) -> None:
    """kill -9 a site process after 2 rounds; a new process continues from the ledger, not from zero."""
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(state), "1", "2"], stdout=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.time() + 120
        while len(lines) < 2 and time.time() < deadline:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.startswith("done"):
                lines.append(line)
        assert len(lines) == 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    after_two = PrivacyLedger(state, accountant="rdp", delta=1e-5, epsilon_budget=100).epsilon()
    res = subprocess.run([sys.executable, "-c", _WORKER.replace("time.sleep(60)", ""), str(state), "3", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    led = PrivacyLedger(state, accountant="rdp", delta=1e-5, epsilon_budget=100)
    assert [r.server_round for r in led.rounds] == [1, 2, 3]
    assert led.epsilon() > after_two
    assert led.epsilon() == pytest.approx(epsilon_for([(1.0, 0.25, 12)], 1e-5, "rdp"), abs=1e-9)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_per_sample_clipping_bounds_one_records_influence(mode: str) -> None:
    """Neighbouring batches (with / without one extreme record), zero noise: the summed gradient moves by <= C."""
    torch.manual_seed(0)
    C = 0.5
    x, y = _data(n=32)
    outlier = np.full((1, 30), 50.0, dtype=np.float32)
    policy = PrivacySpec(noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode=mode)

    def summed_grad(xb: np.ndarray, yb: np.ndarray) -> torch.Tensor:
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        model = build_model("mlp", (30,), 2, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loader = DataLoader(TensorDataset(torch.tensor(xb), torch.tensor(yb)), batch_size=len(yb))
        ledger = PrivacyLedger.__new__(PrivacyLedger)  # not charged: a measurement, not a release
        ledger.accountant = policy.accountant
        dp = DPRound(policy, ledger, 0.0, run_id="", server_round=0)
        m, o, crit, _ = dp.wrap(model, opt, nn.CrossEntropyLoss(), loader)
        o.zero_grad()
        loss = crit(m(torch.tensor(xb)), torch.tensor(yb))
        loss.backward()
        o.step()  # noise 0: p.grad = sum of clipped per-sample grads / expected batch size
        g = torch.cat([p.grad.flatten() for p in m.parameters()]) * o.expected_batch_size
        m._close()
        return g

    base = summed_grad(x, y)
    plus = summed_grad(np.concatenate([x, outlier]), np.concatenate([y, [1]]))
    # expected_batch_size is the same for both (set by the loader); the difference is one clipped grad
    diff = float(torch.linalg.norm(plus - base))
    assert diff <= C * 1.001
    assert diff > 0.1 * C  # the record did contribute (clipped, not dropped)
