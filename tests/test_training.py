"""Local training paths: masks under DP-SGD, mixed precision policies, FedProx step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedseek.config import PrivacySpec
from fedseek.privacy import BF16_NORM_SLACK, DPRound, PrivacyLedger, plan_round
from fedseek.sparsity import init_mask, sparsity_of
from fedseek.train.local import check_precision, evaluate, train_local
from fedseek.train.models import build_model


def _data(n: int = 96, d: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64)
    return x, y


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_masked_dp_training_keeps_pruned_weights_exactly_zero(tmp_path: Path, mode: str, precision: str) -> None:
    x, y = _data()
    model = build_model("mlp", (30,), 2, hidden=[32], seed=0)
    mask = init_mask(model.state_dict(), 0.8, seed=3)
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=100)
    dp = DPRound(PrivacySpec(noise_multiplier=1.0, grad_sample_mode=mode), ledger, 1.0, run_id="t", server_round=1,
                 slack=BF16_NORM_SLACK if precision == "bf16" else 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_local(model, x, y, num_classes=2, epochs=2, lr=0.1, batch_size=16, privacy=dp, precision=precision, mask=mask)
    assert res.steps == plan_round(len(y), 16, 2)[1]
    state = model.state_dict()
    for name, m in mask.items():
        w = state[name].numpy()
        assert np.all(w[~m] == 0.0), f"pruned weights of {name} moved"
        moved = np.abs(w[m] - before[name].numpy()[m]) > 0
        assert moved.mean() > 0.9, f"active weights of {name} did not train"
    assert sparsity_of(model) == pytest.approx(0.8, abs=0.01)
    # the ledger accounts the accounted noise (slack only adds noise)
    assert ledger.history[-1][0] == pytest.approx(1.0)


def test_precision_policy_errors_are_clear() -> None:
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu, private=True) is None
    assert check_precision("bf16", cpu, private=True) is torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_precision("fp16", cpu, private=False)
    with pytest.raises(ValueError, match="not supported with DP-SGD"):
        check_precision("fp16", torch.device("cuda"), private=True)
    with pytest.raises(ValueError, match="allowed: fp32, bf16, fp16"):
        check_precision("fp8", cpu, private=False)


def test_bf16_autocast_trains_to_similar_accuracy() -> None:
    x, y = _data(n=400)
    accs = {}
    for precision in ("fp32", "bf16"):
        model = build_model("mlp", (30,), 2, seed=1)
        train_local(model, x, y, num_classes=2, epochs=5, lr=0.1, batch_size=32, precision=precision, seed=1)
        accs[precision] = evaluate(model, x, y, 2)["accuracy"]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert accs["bf16"] > 0.9 and abs(accs["bf16"] - accs["fp32"]) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_precisions_train(precision: str) -> None:
    x, y = _data(n=400)
    model = build_model("mlp", (30,), 2, seed=1)
    train_local(model, x, y, num_classes=2, epochs=5, lr=0.1, batch_size=32, precision=precision, device="cuda", seed=1)
    assert evaluate(model.cpu(), x, y, 2)["accuracy"] > 0.85


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dp_sgd_with_bf16(tmp_path: Path) -> None:
    x, y = _data(n=400)
    model = build_model("mlp", (30,), 2, seed=1)
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=100)
    dp = DPRound(PrivacySpec(noise_multiplier=1.0), ledger, 1.0, run_id="g", server_round=1, slack=BF16_NORM_SLACK)
    res = train_local(model, x, y, num_classes=2, epochs=3, lr=0.1, batch_size=32, precision="bf16", device="cuda", privacy=dp)
    assert res.dp["epsilon"] > 0 and evaluate(model.cpu(), x, y, 2)["accuracy"] > 0.7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_distillation_under_dp_with_bf16(tmp_path: Path) -> None:
    from fedseek.train.local import distill_targets, teacher_logits

    x, y = _data(n=400)
    teacher = build_model("mlp", (30,), 2, hidden=[64], seed=1)
    train_local(teacher, x, y, num_classes=2, epochs=5, lr=0.1, batch_size=32, device="cuda", precision="fp16", seed=1)
    packed = distill_targets(y, teacher_logits(teacher.cpu(), x))
    student = build_model("mlp", (30,), 2, hidden=[4], seed=2)
    ledger = PrivacyLedger(tmp_path, accountant="rdp", delta=1e-5, epsilon_budget=100)
    dp = DPRound(PrivacySpec(noise_multiplier=1.0), ledger, 1.0, run_id="g", server_round=1, slack=BF16_NORM_SLACK)
    res = train_local(student, x, packed, num_classes=2, epochs=3, lr=0.1, batch_size=32, precision="bf16", device="cuda", privacy=dp,
                      distill=(0.5, 3.0))
    assert res.dp["epsilon"] > 0 and evaluate(student.cpu(), x, y, 2)["accuracy"] > 0.7


def test_fedprox_step_pulls_towards_global() -> None:
    x, y = _data()
    base = build_model("mlp", (30,), 2, seed=2)
    dist = {}
    for mu in (0.0, 5.0):
        model = build_model("mlp", (30,), 2, seed=2)
        train_local(model, x, y, num_classes=2, epochs=3, lr=0.1, batch_size=16, proximal_mu=mu, seed=0)
        dist[mu] = sum(float(((p - q) ** 2).sum().detach()) for p, q in zip(model.parameters(), base.parameters(), strict=True))
    assert dist[5.0] < dist[0.0] * 0.8


def test_seeding_a_cpu_round_is_reproducible_and_registers_nothing_for_absent_accelerators() -> None:
    """seed_torch replaces torch.manual_seed per round: the same CPU stream, without a lazy CUDA seeding (and the stack
    trace torch records with it) on every call of a CPU-only process."""
    from fedseek.train.models import seed_torch

    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    seed_torch(7)
    a = torch.randn(5)
    if tracker is not None and not torch.cuda.is_initialized():
        tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = None, None, []
        for _ in range(20):
            seed_torch(7)
        assert tracker.get_calls() == []  # nothing registered for a backend this process does not use
    seed_torch(7)
    assert torch.equal(torch.randn(5), a)
    torch.manual_seed(7)
    assert torch.equal(torch.randn(5), a)  # the same CPU stream torch.manual_seed gives
