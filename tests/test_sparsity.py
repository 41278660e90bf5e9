"""Sparsity tests: mask construction, schedules, regrowth, and enforcement under real Opacus DP-SGD."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedseek.sparsity import (
    MaskEnforcer,
    canonical_name,
    enforce_mask,
    init_mask,
    magnitude_mask,
    prune_and_regrow,
    schedule_sparsity,
    sparsity_of,
)
from fedseek.train.models import build_model
from fedseek.wire.mask_bits import pack_mask, unpack_mask

torch.set_num_threads(1)


def _mask_sparsity(mask: dict[str, np.ndarray]) -> float:
    total = sum(m.size for m in mask.values())
    return 1 - sum(int(m.sum()) for m in mask.values()) / total


@pytest.fixture(scope="module")
def big_state() -> dict[str, torch.Tensor]:
    return build_model("mlp", (30,), 2, hidden=(256, 128), seed=0).state_dict()


# ----------------------------------------------------------------------------- init masks


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9])
def test_init_mask_hits_target_and_leaves_biases(big_state: dict[str, torch.Tensor], distribution: str, target: float) -> None:
    mask = init_mask(big_state, target, seed=1, distribution=distribution)
    assert set(mask) == {k for k, v in big_state.items() if v.dim() >= 2}
    assert not any(k.endswith("bias") for k in mask)
    for k, m in mask.items():
        assert m.dtype == np.bool_ and m.shape == tuple(big_state[k].shape) and m.any()
    assert abs(_mask_sparsity(mask) - target) < 0.01


def test_init_mask_cnn_covers_conv_kernels_not_groupnorm() -> None:
    state = build_model("cnn", (1, 8, 8), 10, seed=0).state_dict()
    mask = init_mask(state, 0.7, seed=0)
    assert set(mask) == {"features.0.weight", "features.3.weight", "head.weight"}
    assert abs(_mask_sparsity(mask) - 0.7) < 0.01


def test_init_mask_deterministic_by_seed(big_state: dict[str, torch.Tensor]) -> None:
    a = init_mask(big_state, 0.8, seed=7)
    b = init_mask(dict(reversed(list(big_state.items()))), 0.8, seed=7)  # order-independent
    c = init_mask(big_state, 0.8, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_erk_gives_small_layers_higher_density(big_state: dict[str, torch.Tensor]) -> None:
    mask = init_mask(big_state, 0.8, seed=0, distribution="erk")
    dens = {k: m.mean() for k, m in mask.items()}
    assert dens["net.4.weight"] > dens["net.2.weight"]  # 2x128 output layer vs 128x256 hidden


def test_init_mask_on_wrapped_names_uses_canonical_names(big_state: dict[str, torch.Tensor]) -> None:
    wrapped = {f"_module.{k}": v for k, v in big_state.items()}
    a = init_mask(wrapped, 0.5, seed=3)
    b = init_mask(big_state, 0.5, seed=3)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert canonical_name("_module._module.net.0.weight") == "net.0.weight"


def test_mask_argument_validation(big_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        init_mask(big_state, 1.0, seed=0)
    with pytest.raises(ValueError, match="allowed"):
        init_mask(big_state, 0.5, seed=0, scope="biases")
    with pytest.raises(ValueError, match="allowed"):
        init_mask(big_state, 0.5, seed=0, distribution="snip")
    with pytest.raises(ValueError, match="allowed"):
        magnitude_mask(big_state, 0.5, scope="row")


# ----------------------------------------------------------------------------- magnitude masks


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_mask_keeps_largest(big_state: dict[str, torch.Tensor], scope: str) -> None:
    mask = magnitude_mask(big_state, 0.75, scope=scope)
    assert abs(_mask_sparsity(mask) - 0.75) < 0.01
    if scope == "layer":
        for k, m in mask.items():
            w = big_state[k].abs().numpy()
            assert w[m].min() >= w[~m].max()
            assert abs(1 - m.mean() - 0.75) < 0.01
    else:
        kept = np.concatenate([big_state[k].abs().numpy()[m] for k, m in mask.items()])
        dropped = np.concatenate([big_state[k].abs().numpy()[~m] for k, m in mask.items()])
        assert kept.min() >= dropped.max()


def test_magnitude_mask_global_never_kills_a_layer() -> None:
    state = {"a.weight": torch.ones(50, 50), "b.weight": torch.full((2, 50), 1e-6), "b.bias": torch.zeros(2)}
    mask = magnitude_mask(state, 0.9, scope="global")
    assert mask["b.weight"].sum() == 1 and "b.bias" not in mask


def test_magnitude_mask_prunes_already_zero_weights_first(big_state: dict[str, torch.Tensor]) -> None:
    model = build_model("mlp", (30,), 2, hidden=(256, 128), seed=0)
    first = magnitude_mask(model.state_dict(), 0.5)
    MaskEnforcer(model, first).apply()
    second = magnitude_mask(model.state_dict(), 0.7)
    for k in first:
        assert not np.any(second[k] & ~first[k])  # monotone: nothing pruned comes back


# ----------------------------------------------------------------------------- schedule


def test_schedule_monotone_from_zero_to_final() -> None:
    total, final = 20, 0.8
    vals = [schedule_sparsity(r, total, final) for r in range(1, total + 1)]
    assert vals[0] == 0.0
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))
    assert vals[-1] == final and vals[14] == final  # reached at ceil(0.75 * 20) = 15
    # cubic (Zhu & Gupta): halfway through the ramp, 1 - 0.5^3 of the way there
    assert schedule_sparsity(8, total, final, start_round=1, end_fraction=0.75) == pytest.approx(final * (1 - (1 - 7 / 14) ** 3))
    assert schedule_sparsity(3, 10, 0.5, start_round=5) == 0.0
    assert schedule_sparsity(1, 1, 0.5) == 0.5  # degenerate ramp: final at once
    with pytest.raises(ValueError):
        schedule_sparsity(1, 10, 1.0)


# ----------------------------------------------------------------------------- prune and regrow


@pytest.mark.parametrize("regrow", ["random", "magnitude"])
def test_prune_and_regrow_keeps_density(big_state: dict[str, torch.Tensor], regrow: str) -> None:
    model = build_model("mlp", (30,), 2, hidden=(256, 128), seed=0)
    mask = init_mask(big_state, 0.8, seed=0)
    MaskEnforcer(model, mask).apply()
    state = model.state_dict()
    new = prune_and_regrow(state, mask, drop_fraction=0.3, seed=1, regrow=regrow)
    again = prune_and_regrow(state, mask, drop_fraction=0.3, seed=1, regrow=regrow)
    for k, m in mask.items():
        assert new[k].sum() == m.sum()
        assert np.array_equal(new[k], again[k])
        dropped = m & ~new[k]
        grown = new[k] & ~m
        assert dropped.sum() == grown.sum() == min(round(0.3 * m.sum()), (~m).sum())  # ERK keeps the head dense
        if dropped.any():
            w = state[k].abs().numpy()
            assert w[dropped].max() <= w[m & new[k]].min()  # drop the smallest active weights
    assert any((new[k] != mask[k]).any() for k in mask)
    assert prune_and_regrow(state, mask, 0.0, seed=1)["net.0.weight"].sum() == mask["net.0.weight"].sum()


# ----------------------------------------------------------------------------- apply / enforce (plain torch)


def test_enforcer_apply_and_sparsity_of(big_state: dict[str, torch.Tensor]) -> None:
    model = build_model("mlp", (30,), 2, hidden=(256, 128), seed=0)
    mask = init_mask(big_state, 0.6, seed=0)
    enforcer = MaskEnforcer(model, mask)
    enforcer.apply()
    assert enforcer.num_tensors == 3
    assert abs(sparsity_of(model) - 0.6) < 0.01
    assert sparsity_of(mask) == pytest.approx(_mask_sparsity(mask))
    assert all(p.abs().min() > 0 for n, p in model.named_parameters() if n.endswith("bias"))
    with pytest.raises(ValueError, match="matches no parameter"):
        MaskEnforcer(model, {"nope.weight": np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="shape"):
        MaskEnforcer(model, {"net.0.weight": np.ones((2, 2), bool)})


def test_enforcer_with_plain_sgd_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (30,), 2, seed=0)
    mask = init_mask(model.state_dict(), 0.5, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y = torch.randn(64, 30), torch.randint(0, 2, (64,))
    with enforce_mask(model, opt, mask) as enf:
        assert enf.num_tensors == 2
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            for k, m in mask.items():
                p = dict(model.named_parameters())[k]
                assert torch.all(p[torch.from_numpy(~m)] == 0)
                assert p.grad is not None and torch.all(p.grad[torch.from_numpy(~m)] == 0)
    assert "step" not in vars(opt)  # detached: the optimizer's own step is back


def test_after_step_rezeroes_weights_that_were_not_zero() -> None:
    """The post-step re-zeroing is the backstop: attach without apply, one step fixes everything."""
    model = build_model("mlp", (30,), 2, seed=0)
    mask = init_mask(model.state_dict(), 0.5, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    MaskEnforcer(model, mask).attach(opt)
    assert sparsity_of(model) == 0.0
    nn.functional.cross_entropy(model(torch.randn(8, 30)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert abs(sparsity_of(model) - 0.5) < 0.01


def test_enforcer_closure_path() -> None:
    model = build_model("mlp", (30,), 2, seed=0)
    mask = init_mask(model.state_dict(), 0.5, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 30), torch.randint(0, 2, (32,))
    enforce_mask(model, opt, mask)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert sparsity_of(model) >= 0.5 - 0.01


# ----------------------------------------------------------------------------- real Opacus


def _private(seed: int = 0, n: int = 256) -> tuple[nn.Module, nn.Module, Any, Any, Any]:
    """A tiny MLP made private by Opacus 1.6 (RDP accountant, default hooks mode)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = build_model("mlp", (30,), 2, seed=seed)
    x = torch.randn(n, 30)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel, popt, ploader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
    return model, pmodel, popt, ploader, engine


def test_opacus_pruned_weights_stay_exactly_zero_every_step() -> None:
    pytest.importorskip("opacus")
    model, pmodel, popt, loader, engine = _private()
    # the mask is built from the wrapped model's state_dict ("_module." names): canonical keys
    mask = init_mask(pmodel.state_dict(), 0.6, seed=0)
    assert set(mask) == {"net.0.weight", "net.2.weight"}
    enforcer = MaskEnforcer(pmodel, mask)
    enforcer.apply()
    params: dict[str, Any] = {canonical_name(n): p for n, p in pmodel.named_parameters()}
    pruned = {k: torch.from_numpy(~m) for k, m in mask.items()}
    before = {k: p.detach().clone() for k, p in params.items()}
    enforcer.attach(popt)
    steps = 0
    for xb, yb in loader:
        popt.zero_grad()
        nn.functional.cross_entropy(pmodel(xb), yb).backward()
        popt.step()
        steps += 1
        for k, pm in pruned.items():
            p = params[k]
            assert torch.count_nonzero(p[pm]) == 0, f"pruned weights of {k} moved at step {steps}"
            assert torch.count_nonzero(p.grad[pm]) == 0, "noise landed on pruned weights"
            # clipping saw masked per-sample grads: the clipped sum is 0 on pruned coordinates
            assert torch.count_nonzero(p.summed_grad[pm]) == 0
            assert torch.all(p[~pm] != before[k][~pm]), "every active weight gets noise, so all move"
            before[k] = p.detach().clone()
    assert steps >= 3
    assert abs(sparsity_of(pmodel) - 0.6) < 0.01
    assert abs(sparsity_of(model.state_dict()) - 0.6) < 0.01  # same parameters, unwrapped names
    # the accountant (Opacus' single step-hook slot) still counted every step
    assert sum(h[2] for h in engine.accountant.history) == steps
    assert engine.get_epsilon(1e-5) > 0
    enforcer.detach()
    assert "step" not in vars(popt)


def test_opacus_ghost_clipping_mode() -> None:
    """Ghost clipping (the fast mode) has no per-sample grads; noise masking and re-zeroing still hold."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(2)
    model = build_model("mlp", (30,), 2, seed=2)
    x = torch.randn(128, 30)
    loader = DataLoader(TensorDataset(x, (x[:, 1] > 0).long()), batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel, popt, crit, ploader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        )
    mask = init_mask(model.state_dict(), 0.7, seed=1)
    enforce_mask(pmodel, popt, mask)
    for xb, yb in ploader:
        popt.zero_grad()
        crit(pmodel(xb), yb).backward()
        popt.step()
        for k, m in mask.items():
            p = dict(model.named_parameters())[k]
            assert torch.count_nonzero(p[torch.from_numpy(~m)]) == 0
            assert p.grad is not None and torch.count_nonzero(p.grad[torch.from_numpy(~m)]) == 0
    assert abs(sparsity_of(model) - 0.7) < 0.01


def test_opacus_without_enforcer_noise_hits_pruned_weights() -> None:
    """Why MaskEnforcer exists: zeroing once is not enough, DP noise lands on every coordinate."""
    pytest.importorskip("opacus")
    model, pmodel, popt, loader, _ = _private(seed=1)
    mask = init_mask(model.state_dict(), 0.6, seed=0)
    MaskEnforcer(pmodel, mask).apply()
    xb, yb = next(iter(loader))
    popt.zero_grad()
    nn.functional.cross_entropy(pmodel(xb), yb).backward()
    popt.step()
    assert sparsity_of(model) < 0.01


def _reference_masked_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: dict[str, np.ndarray]) -> torch.Tensor:
    """Per-record gradient norms over the active coordinates, by torch.func (independent of Opacus)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    sq = torch.zeros(len(x))
    for name, g in gs.items():
        if name in mask:
            g = g * torch.from_numpy(mask[name]).to(g.dtype)
        sq = sq + g.reshape(len(x), -1).pow(2).sum(1)
    return sq.sqrt()


@pytest.mark.parametrize("kind,precision", [("mlp", "fp32"), ("cnn", "fp32"), ("cnn", "bf16")])
def test_ghost_clipping_norms_count_active_weights_only(kind: str, precision: str) -> None:
    """With a mask, Opacus' per-sample norms (ghost mode) are those of the masked gradients, not the dense ones."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    shape = (30,) if kind == "mlp" else (1, 8, 8)
    model = build_model(kind, shape, 3, hidden=(64,), seed=4)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(48, *shape, generator=gen)
    y = torch.randint(0, 3, (48,), generator=gen)
    mask = init_mask(model.state_dict(), 0.8, seed=4)
    MaskEnforcer(model, mask).apply()
    expected = _reference_masked_norms(model, x, y, mask)
    dense = _reference_masked_norms(model, x, y, {})
    assert torch.all(dense > expected * 1.2), "the test needs pruned coordinates that carry gradient"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel, popt, crit, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=48), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        )
    enforcer = enforce_mask(pmodel, popt, mask)
    popt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = pmodel(x)
    crit(out.float(), y).backward()
    got = pmodel.per_sample_gradient_norms.detach()
    assert got.dtype == torch.float32
    tol = 3e-2 if precision == "bf16" else 1e-4  # bf16 forward/backward rounding; the norms themselves are summed in fp32
    assert torch.allclose(got, expected, rtol=tol, atol=1e-6), (got[:4], expected[:4], dense[:4])
    if precision == "bf16":
        return
    enforcer.detach()
    # detached: the next model wrapped without a mask gets Opacus' dense norms again
    popt.zero_grad()
    crit(pmodel(x), y).backward()
    assert torch.allclose(pmodel.per_sample_gradient_norms.detach(), dense, rtol=1e-4, atol=1e-6)


def test_hooks_mode_per_sample_grads_are_masked_at_backward() -> None:
    """Hooks mode: per-sample gradients of pruned weights are zero as soon as Opacus computes them."""
    model, pmodel, popt, loader, _ = _private(seed=3)
    mask = init_mask(pmodel.state_dict(), 0.7, seed=3)
    enforce_mask(pmodel, popt, mask)
    xb, yb = next(iter(loader))
    popt.zero_grad()
    nn.functional.cross_entropy(pmodel(xb), yb).backward()
    params: dict[str, Any] = {canonical_name(n): p for n, p in pmodel.named_parameters()}
    for k, m in mask.items():
        gs = params[k].grad_sample
        assert gs.shape[0] == len(yb)
        assert torch.count_nonzero(gs[:, torch.from_numpy(~m)]) == 0
        assert torch.count_nonzero(gs[:, torch.from_numpy(m)]) > 0
    popt.step()


# ----------------------------------------------------------------------------- transport


def test_pack_unpack_mask(big_state: dict[str, torch.Tensor]) -> None:
    mask = init_mask(big_state, 0.7, seed=2)
    packed = pack_mask(mask)
    shapes = {k: m.shape for k, m in mask.items()}
    assert sum(p.nbytes for p in packed.values()) == sum((m.size + 7) // 8 for m in mask.values())
    back = unpack_mask(packed, shapes)
    assert all(np.array_equal(back[k], mask[k]) for k in mask)
    bad = dict(packed)
    bad["net.4.weight"] = bad["net.4.weight"][:-1]
    with pytest.raises(ValueError):
        unpack_mask(bad, shapes)
    with pytest.raises(ValueError):
        unpack_mask(packed, {"x": (2,)})
