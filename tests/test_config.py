"""Config validation: good files load into typed objects; bad ones give one clear line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedseek.config import ConfigError, PrivacySpec, ScenarioConfig, load_scenario, parse
from tests.conftest import ROOT

WriteYaml = Callable[..., Path]


@pytest.mark.parametrize("name", ["hospitals", "digits", "banks", "hospitals_dp", "digits_student", "digits_dp", "digits_distributed_dp"])
def test_shipped_scenarios_load(name: str) -> None:
    cfg = load_scenario(ROOT / "simulations" / f"{name}.yaml")
    assert isinstance(cfg, ScenarioConfig)
    assert cfg.num_sites >= cfg.strategy.min_sites


def test_defaults_fill_in(write_yaml: WriteYaml) -> None:
    cfg = load_scenario(write_yaml("num_sites: 3\n"))
    assert cfg.rounds == 5 and cfg.strategy.name == "fedavg" and cfg.privacy is None


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("strategy: {name: fedsgd}\n", "strategy.name", ["fedavg", "fedprox", "fedadam"]),
        ("rounds: 0\n", "rounds", ["greater than or equal to 1"]),
        ("num_sites: 3\nstrategy: {min_sites: 5}\n", "(top level)", ["min_sites"]),
        ("trian: {lr: 0.1}\n", "trian", ["unknown key"]),
        ("partition: {scheme: random}\n", "partition.scheme", ["iid", "dirichlet"]),
        ("privacy: {delta: 2}\n", "privacy.delta", ["less than 1"]),
        ("privacy: {noise_multiplier: 1.0, target_epsilon_per_round: 1}\n", "privacy", ["at most one"]),
        ("privacy: {accountant: gdp}\n", "privacy.accountant", ["rdp", "prv"]),
    ],
)
def test_bad_values_name_the_key(write_yaml: WriteYaml, text: str, key: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_scenario(write_yaml(text))
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'{key}'" in msg
    for w in words:
        assert w in msg


def test_yaml_syntax_and_missing_file(write_yaml: WriteYaml, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_scenario(write_yaml("rounds: [1, 2\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_scenario(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_scenario(write_yaml("- a\n- b\n"))


def test_privacy_spec_rules() -> None:
    p = parse(PrivacySpec, {"epsilon_budget": 3, "delta": 1e-5})
    assert p.accountant == "prv" and "accountant" not in p.model_fields_set and p.grad_sample_mode == "ghost"
    with pytest.raises(ConfigError, match="epsilon_budget"):
        parse(PrivacySpec, {"epsilon_budget": -1})


def test_cli_malformed_scenario_exits_2_with_one_line(write_yaml: WriteYaml) -> None:
    bad = write_yaml("num_sites: 4\nstrategy:\n  name: fedsgd\n")
    res = subprocess.run([sys.executable, "-m", "fedseek.ops.cli", "simulate", str(bad), "--out", str(bad.parent / "o")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "strategy.name" in lines[0] and "fedavg" in lines[0]
