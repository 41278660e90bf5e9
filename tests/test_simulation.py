"""Real simulations through Flower's simulation engine (Ray): outputs, DP budget, restarts, clean shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedseek.privacy import PrivacyLedger, epsilon_for
from tests.conftest import ROOT
from tests.test_coordinator import run_in_process

pytestmark = pytest.mark.slow


def _fedseek(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _descendant_free(out: Path) -> list[str]:
    """Processes still running whose command line mentions this run's directory (none expected)."""
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(out) in cmd and "pytest" not in cmd:
            left.append(f"{proc.pid}: {cmd[:120]}")
    return left


def test_short_simulation_writes_the_output_contract(tmp_path):
    scen = tmp_path / "s.yaml"
    scen.write_text(
        "name: t\nseed: 1\nnum_sites: 4\nrounds: 2\ndata: {dataset: breast_cancer}\n"
        "partition: {scheme: dirichlet, alpha: 1.0}\nstrategy: {min_sites: 4}\n"
        "train: {local_epochs: 2, lr: 0.05, batch_size: 16}\n"
    )
    out = tmp_path / "out"
    res = _fedseek("simulate", str(scen), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sampled"] == 4 and r["accepted"] == 4 for r in rows)  # all sites registered before round 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["final_accuracy"] > 0.85
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert (out / "model.pt").exists() and json.loads((out / "model.json").read_text())["kind"] == "mlp"
    assert (out / "checkpoint" / "state.json").exists()
    assert "round   2/2" in res.stderr
    assert (out / "report.html").stat().st_size > 0
    assert "[fedseek] done (completed): final accuracy" in (out / "run.log").read_text()  # the ServerApp's log, streamed by the launcher
    assert _descendant_free(out) == []


def test_dp_budget_refusal_and_restart_continue_epsilon(tmp_path):
    """Sites keep one ledger across runs (restart = new processes): epsilon continues, then the budget stops them."""
    scen = tmp_path / "dp.yaml"
    scen.write_text(
        "name: dp\nseed: 2\nnum_sites: 3\nrounds: 2\ndata: {dataset: breast_cancer}\nstrategy: {min_sites: 3}\n"
        "train: {local_epochs: 1, lr: 0.1, batch_size: 32}\n"
        "privacy: {epsilon_budget: 2.0, delta: 1.0e-5, noise_multiplier: 2.0, grad_sample_mode: ghost}\n"
    )
    state = tmp_path / "state"
    # the first run in this process (the coordinator and the real ClientApp, no Ray: the suite's time budget); the second is a
    # real simulation in new processes that must find the ledgers the first one left
    first = run_in_process(scen, tmp_path / "run1", 3, state_dir=state)
    assert first.rounds_completed == 2
    led = PrivacyLedger(state / "site-000", accountant="prv", delta=1e-5, epsilon_budget=2.0)
    eps_after_run1 = led.epsilon()
    assert len(led.rounds) == 2 and eps_after_run1 > 0

    second = _fedseek("simulate", str(scen), "--out", str(tmp_path / "run2"), "--state-dir", str(state))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    led = PrivacyLedger(state / "site-000", accountant="prv", delta=1e-5, epsilon_budget=2.0)
    # the second run continued from run 1's epsilon (no reset) ...
    assert led.rounds[0].run_id != led.rounds[-1].run_id
    assert led.epsilon() > eps_after_run1
    assert led.epsilon() == pytest.approx(epsilon_for(led.history, 1e-5, "prv"))
    # ... and every site stopped at its budget: refusals were logged, the run still finished
    assert summary["refused_rounds"] >= 1
    for name, site in summary["privacy"]["sites"].items():
        assert site["epsilon"] <= 2.0, name
    assert all(PrivacyLedger(d, accountant="prv", delta=1e-5, epsilon_budget=2.0).epsilon() <= 2.0 for d in state.iterdir())
    rows = [json.loads(ln) for ln in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["refused"] for r in rows)


def test_compressed_sparse_watermarked_bf16_dp_run(tmp_path):
    """All round features together: DP-SGD in bf16, 80% fixed mask, top-k+int8 uplink, fp16 downlink, watermark.

    In-process (the coordinator and the real ClientApp, messages serialized as by the transport): what is checked is
    the round logic, which `fedseek simulate` runs unchanged; the simulate path keeps its own tests here."""
    import torch

    scen = tmp_path / "all.yaml"
    scen.write_text(
        "name: all\nseed: 3\nnum_sites: 4\nrounds: 3\ndata: {dataset: breast_cancer}\nstrategy: {min_sites: 4}\n"
        "model: {kind: mlp, hidden: [64]}\ntrain: {local_epochs: 2, lr: 0.1, batch_size: 16}\nprecision: bf16\n"
        "privacy: {epsilon_budget: 8.0, delta: 1.0e-5}\n"
        "compression: {codec: topk, topk_fraction: 0.1, quantize: int8, downlink: fp16}\n"
        "sparsity: {enabled: true, target: 0.8, schedule: fixed}\n"
        "watermark: {enabled: true, triggers: 200}\n"
    )
    out = tmp_path / "out"
    run_in_process(scen, out, 4, state_dir=tmp_path / "state")
    s = json.loads((out / "summary.json").read_text())
    assert s["compression"]["ratio_up"] > 5  # exact payload bytes vs dense fp32
    assert s["bytes_down"] < 0.6 * s["dense_bytes_up"]  # fp16 global (+1-bit mask) vs fp32 updates, same sites and rounds
    assert abs(s["sparsity"] - 0.8) < 0.02
    assert s["watermark"]["detected"] and s["watermark"]["p_value"] < 1e-6
    assert s["privacy"]["max_epsilon"] <= 8.0
    model = torch.load(out / "model.pt", weights_only=True)
    mask = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["parts"]["model"]["mask"]  # checkpoint layout 2
    for name, m in mask.items():
        assert torch.all(model[name][~torch.from_numpy(m)] == 0), name
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["watermark"]["p_value"] < 1e-6 for r in rows)

    ok = _fedseek("watermark", "verify", "--key", str(out / "watermark.key"), "--model", str(out / "model.pt"))
    assert ok.returncode == 0 and "WATERMARK DETECTED" in ok.stdout
    other = tmp_path / "other.key"
    assert _fedseek("watermark", "keygen", "--scenario", str(scen), "--out", str(other), "--triggers", "200").returncode == 0
    no = _fedseek("watermark", "verify", "--key", str(other), "--model", str(out / "model.pt"))
    assert no.returncode == 0 and "not detected" in no.stdout
