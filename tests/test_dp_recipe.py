"""DP models worth training: the auto recipe a DP site derives for itself, the released average, server momentum."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedseek.config import FederationSpec, PrivacySpec
from fedseek.privacy import PrivacyLedger
from fedseek.runtime.global_model import GlobalModel
from fedseek.runtime.site_privacy import AUTO_STEP, site_recipe
from fedseek.wire.records import ModelMeta, RoundConfig
from tests.test_coordinator import _scenario, run_in_process

META = ModelMeta(kind="mlp", hidden=[4], input_shape=[4], num_classes=2)


def _cfg(recipe: str) -> RoundConfig:
    return RoundConfig(server_round=1, num_rounds=5, lr=0.05, local_epochs=3, batch_size=16, momentum=0.9, recipe=recipe,
                       model=META)


def _site(n: int, privacy: PrivacySpec | None) -> SimpleNamespace:
    return SimpleNamespace(y=np.zeros(n), privacy=privacy)


def test_auto_recipe_is_the_sites_own_under_dp_and_the_coordinators_otherwise():
    pol = PrivacySpec(max_grad_norm=2.0, max_batch_size=1024)
    small = site_recipe(_site(67, pol), _cfg("auto"))  # type: ignore[arg-type]
    assert (small.batch_size, small.local_epochs, small.momentum) == (67, 1, 0.0)  # all records, one step
    assert small.lr == pytest.approx(AUTO_STEP / 2.0)  # lr x clip norm is the rule, whatever the coordinator sent
    large = site_recipe(_site(5000, pol), _cfg("auto"))  # type: ignore[arg-type]
    assert (large.batch_size, large.local_epochs) == (1024, 1)  # the site's own batch cap: 5 steps at q = 1/5
    assert site_recipe(_site(67, None), _cfg("auto")) == _cfg("auto")  # no DP: the coordinator's recipe
    assert site_recipe(_site(67, pol), _cfg("fixed")) == _cfg("fixed")
    assert RoundConfig.from_record(_cfg("auto").to_record()).recipe == "auto"
    from flwr.app import ConfigRecord

    from fedseek.wire.records import RecordError

    bad = dict(_cfg("auto").to_record())
    bad["recipe"] = "unbounded"
    with pytest.raises(RecordError, match="recipe"):  # a coordinator cannot name a recipe the site does not know
        RoundConfig.from_record(ConfigRecord(bad))


def test_a_bad_recipe_name_is_one_line_naming_the_choices(tmp_path):
    from fedseek.config import ConfigError, load_scenario

    path = tmp_path / "s.yaml"
    path.write_text("name: x\nnum_sites: 2\ndata: {dataset: breast_cancer}\ntrain: {recipe: tuned}\n")
    with pytest.raises(ConfigError, match="train.recipe") as err:
        load_scenario(path)
    assert "'fixed'" in str(err.value) and "'auto'" in str(err.value) and "\n" not in str(err.value)


def test_auto_recipe_sites_charge_one_full_batch_step_per_round(tmp_path):
    """The real ClientApp under DP with recipe auto: each site's ledger holds rounds x (sigma, q = 1, 1 step), one noise."""
    scen = _scenario(tmp_path, rounds=3, train={"recipe": "auto", "batch_size": 8, "local_epochs": 4},
                     privacy={"epsilon_budget": 3.0, "planning_rounds": 3, "grad_sample_mode": "hooks"})
    summary = run_in_process(scen, tmp_path / "out", 3, state_dir=tmp_path / "state")
    assert summary.rounds_completed == 3
    for i in range(3):
        ledger = PrivacyLedger(tmp_path / "state" / f"site-{i:03d}", accountant="prv", delta=1e-5, epsilon_budget=3.0)
        (sigma, q, steps), = {tuple(h) for h in ledger.history}
        assert (q, steps, len(ledger.history)) == (1.0, 1, 3) and sigma > 1.0
        assert 2.9 < ledger.epsilon() <= 3.0  # the whole budget over the site's 3 planned rounds, not 4 epochs of batch 8


def test_the_released_average_is_what_is_evaluated_saved_and_checkpointed():
    spec = FederationSpec(model={"kind": "mlp", "hidden": [4]}, strategy={"ema_decay": 0.5})
    gm = GlobalModel(spec, (4,), 2)
    rng = np.random.default_rng(1)
    a, b = ({k: rng.normal(size=v.shape).astype(np.float32) for k, v in gm.arrays.items()} for _ in range(2))
    gm.arrays = a
    gm.update_average()
    gm.arrays = b
    gm.update_average()
    assert all(np.allclose(gm.released[k], 0.5 * a[k] + 0.5 * b[k]) for k in a)
    again = GlobalModel(spec, (4,), 2)
    again.load_state_dict(gm.state_dict())
    assert all(np.allclose(again.released[k], gm.released[k]) and np.allclose(again.arrays[k], b[k]) for k in a)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    test = SimpleNamespace(x=x, y=(x[:, 0] > 0).astype(np.int64), num_classes=2)
    assert gm.evaluate(test) == gm.evaluate_arrays(gm.released, test)[0] != gm.evaluate_arrays(gm.arrays, test)[0]
    plain = GlobalModel(FederationSpec(model={"kind": "mlp", "hidden": [4]}), (4,), 2)
    plain.update_average()
    assert plain.released is plain.arrays  # ema_decay 0: the latest global model


def test_a_run_with_server_momentum_and_an_average_saves_the_average(tmp_path):
    """fedavgm (Flower's FedAvgM) with ema_decay: model.pt is the average, model_last.pt too; the momentum is checkpointed."""
    scen = _scenario(tmp_path, rounds=3, strategy={"name": "fedavgm", "server_lr": 0.5, "server_momentum": 0.9, "ema_decay": 0.6})
    summary = run_in_process(scen, tmp_path / "out", 3)
    saved = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=False)
    ckpt = saved["parts"] if "parts" in saved else saved
    model_state = ckpt["model"]
    assert model_state["ema"] is not None
    assert any(k.startswith("momentum_vector/") for k in ckpt["strategy"]["inner"])
    kept = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert all(np.allclose(np.asarray(kept[k]), model_state["ema"][k]) for k in model_state["ema"])
    assert not all(np.allclose(model_state["ema"][k], model_state["arrays"][k]) for k in model_state["ema"])
    assert summary.final_accuracy is not None and summary.final_accuracy > summary.initial["accuracy"]
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card["training"]["average"] == 0.6 and card["training"]["round"] == 3  # the card says model.pt is an average


def test_an_average_with_the_watermark_is_refused_in_one_line():
    with pytest.raises(ValueError, match="ema_decay"):
        FederationSpec(strategy={"ema_decay": 0.9}, watermark={"enabled": True})


def test_simulate_notes_a_planning_horizon_that_differs_from_the_rounds(tmp_path):
    from fedseek.config import load_scenario
    from fedseek.ops.simulate import horizon_note

    def note(rounds: int, privacy: str) -> str | None:
        path = tmp_path / "s.yaml"
        path.write_text(f"name: x\nnum_sites: 2\nrounds: {rounds}\ndata: {{dataset: breast_cancer}}\nprivacy: {privacy}\n")
        return horizon_note(load_scenario(path))

    assert "refused" in (note(60, "{planning_rounds: 10}") or "")
    assert "spends about 10/60" in (note(10, "{planning_rounds: 60}") or "")
    assert note(60, "{planning_rounds: 60}") is None and note(60, "{noise_multiplier: 1.0}") is None
