"""`fedseek simulate`: N virtual sites through Flower's own simulation engine (Ray).

It starts a private simulation SuperLink on a free loopback port (its state and logs in
OUT/.flwr), hands the run to the shared launcher (fedseek.ops.launcher: staged app, submit,
per-round progress from OUT/metrics.jsonl) and on exit (normal, failure, Ctrl-C or SIGTERM)
stops every process it started. The exit code reflects the run's real status.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import ConfigError, ScenarioConfig, load_scenario
from fedseek.ops.flower_control import RunConfigValue, flower_env, flwr_bin, write_connection
from fedseek.ops.follow import RunError, tail
from fedseek.ops.launcher import Launcher, RunRequest, prepare_out, report
from fedseek.ops.processes import ProcessTree, free_port, start_process, wait_for_port
from fedseek.outputs.schema import MetricsRow

CONNECTION = "fedseek-sim"


class SimulationError(RunError):
    """The simulation did not complete; the message says why and where the logs are."""


def _header(cfg: ScenarioConfig) -> str:
    dp = f", DP eps<={cfg.privacy.epsilon_budget:g}" if cfg.privacy and cfg.privacy.enabled else ""
    if dp and cfg.privacy and cfg.privacy.mode == "distributed":
        dp += f" (distributed: SecAgg+ sums of >= {cfg.privacy.distributed.min_sites} sites)"
    return (f"[bold]fedseek[/] simulate [cyan]{cfg.name}[/]: {cfg.num_sites} sites, {cfg.rounds} rounds, "
            f"{cfg.data.source_name}, {cfg.strategy.name}{dp}")


def _request(cfg: ScenarioConfig, scenario_path: Path, out: Path, port: int, *, state_dir: str | Path | None,
             timeout_s: float | None, resume: bool) -> RunRequest:
    """The run config and simulation federation config for this scenario (on an existing cluster: its own resources)."""
    run_config: dict[str, RunConfigValue] = {"config-path": str(scenario_path), "out-dir": str(out), "config-kind": "scenario",
                                             "resume": resume}
    if state_dir is not None:
        run_config["state-dir"] = str(Path(state_dir).resolve())
    federation: dict[str, int | float] = {"num-supernodes": cfg.num_sites, "client-resources-num-cpus": cfg.simulation.cpus_per_site}
    if cfg.simulation.gpus_per_site:
        federation["client-resources-num-gpus"] = cfg.simulation.gpus_per_site
    if cfg.simulation.ray_address is None:  # Ray refuses num_cpus when it connects to an existing cluster
        federation["init-args-num-cpus"] = cfg.simulation.ray_cpus or max(1, _cores())
    return RunRequest(
        flwr_home=out / ".flwr", connection=CONNECTION, out=out, run_config=run_config, rounds=cfg.rounds, sites=cfg.num_sites,
        timeout_s=timeout_s or (cfg.round_timeout_s * cfg.rounds + cfg.simulation.node_wait_s + 300),
        federation_config=federation,
        site_word="virtual sites", error=SimulationError, finish_on_outputs=True,
        metrics=cfg.metrics, run_name=cfg.name, watermark=cfg.watermark.enabled,
        resume_hint=f"continue from the last checkpoint with `fedseek simulate {scenario_path} --out {out} --resume`")


#: SIGTERM grace for the private SuperLink and its Ray processes before SIGKILL. They hold nothing worth keeping (the
#: run's outputs, checkpoint and ledgers are fedseek's files), and a SuperLink whose run was ended early (see
#: RunRequest.finish_on_outputs) sometimes waits seconds (up to ~10 s measured) for open connections before exiting on SIGTERM.
STOP_GRACE_S = 1.0


def _start_superlink(flwr_home: Path, port: int, log_fh: Any, ray_address: str | None = None) -> ProcessTree:
    """The private simulation SuperLink (insecure, loopback only, its database in OUT/.flwr).

    Its simulation engine calls ray.init() without an address, which joins the cluster RAY_ADDRESS
    names, else one started with `ray start` on this machine, else starts a Ray of its own. So
    RAY_ADDRESS is always set: the cluster asked for, or "local" (a Ray of its own, even when the
    shell names a cluster or one runs on this machine).
    """
    env = flower_env(flwr_home)
    env["RAY_ADDRESS"] = ray_address if ray_address is not None else "local"
    env["PATH"] = str(_engine_shim(flwr_home)) + os.pathsep + env["PATH"]
    return start_process(
        [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(flwr_home / "state.db"),
         "--disable-runtime-dependency-installation"],
        env=env, log=log_fh, name="superlink",
    )


def _engine_shim(flwr_home: Path) -> Path:
    """A bin dir whose `flwr-simulation` is Flower's with fedseek's one-pass message sweep (fedseek.ops.sim_engine)."""
    bin_dir = flwr_home / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "flwr-simulation"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedseek.ops.sim_engine "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def _watch(superlink: ProcessTree, log_path: Path, sample_every_s: float = 1.0) -> Callable[[], str | None]:
    """A liveness check for the follow loop that also samples the SuperLink's process tree (Ray's workers) now and then."""
    last = [0.0]

    def alive() -> str | None:
        if time.monotonic() - last[0] >= sample_every_s:
            superlink.sample()
            last[0] = time.monotonic()
        if superlink.proc.poll() is not None:
            return f"the SuperLink exited with code {superlink.proc.returncode}; see {log_path}"
        return None

    return alive


def simulate(
    scenario_path: str | Path,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    state_dir: str | Path | None = None,
    timeout_s: float | None = None,
    on_round: Callable[[MetricsRow], None] | None = None,
    resume: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run a scenario to completion; returns summary.json's content or raises SimulationError.

    `ray_address` (or the scenario's simulation.ray_address) runs the virtual sites on that existing Ray cluster.
    """
    console = console or Console(stderr=True)
    scenario_path = Path(scenario_path).resolve()
    cfg = load_scenario(scenario_path)  # ConfigError surfaces before anything starts
    if ray_address is not None:
        cfg.simulation.ray_address, cfg.simulation.ray_cpus = ray_address, None
    if cfg.simulation.ray_address is not None:
        _check_cluster(cfg, console)
    if cfg.data.own_tables:  # every table read, split and checked here: a bad file is one line, before any process
        from fedseek.data.scenario_data import check_scenario_data

        try:
            check_scenario_data(cfg)
        except ValueError as exc:  # DataError included
            raise ConfigError(f"{scenario_path}: data: {exc}") from None
    if cfg.distill is not None:
        state_dir = _distill_state(cfg, scenario_path, state_dir, console)
    out = prepare_out(Path(out_dir).resolve(), resume=resume)
    port = free_port()
    req = _request(cfg, scenario_path, out, port, state_dir=state_dir, timeout_s=timeout_s, resume=resume)
    write_connection(req.flwr_home, CONNECTION, f"127.0.0.1:{port}")
    _warn_spent_ledgers(cfg, Path(state_dir) if state_dir else out / "sites", console)
    _note_horizon(cfg, console)
    log_path = out / "flower.log"
    t0 = time.time()
    console.print(_header(cfg))
    launcher: Launcher | None = None
    with open(log_path, "ab") as log_fh:
        superlink = _start_superlink(req.flwr_home, port, log_fh, cfg.simulation.ray_address)
        try:
            req.check_alive = _watch(superlink, log_path)
            launcher = Launcher(req, console)  # stages the app while the SuperLink starts
            try:
                wait_for_port("127.0.0.1", port, 60, superlink.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise SimulationError(f"the simulation SuperLink did not start ({exc}); see {log_path}:\n{tail(log_path)}") from None
            outcome = launcher.follow(on_round)
        finally:
            if launcher is not None:
                launcher.close()
            superlink.stop(timeout_s=STOP_GRACE_S)
    return report(console, outcome, out, t0)


def _check_cluster(cfg: ScenarioConfig, console: Console) -> None:
    """The cluster answers and every node can run a virtual site (SimulationError, one line); say what it has."""
    from fedseek.ops.ray_cluster import ClusterError, check_cluster

    address = str(cfg.simulation.ray_address)
    try:
        info = check_cluster(address)
    except ClusterError as exc:
        raise SimulationError(str(exc)) from None
    need = cfg.simulation.cpus_per_site
    if info.cpus < need or (cfg.simulation.gpus_per_site and info.gpus < cfg.simulation.gpus_per_site):
        raise SimulationError(f"Ray cluster {address}: {info.cpus:g} CPUs and {info.gpus:g} GPUs cannot hold one virtual site "
                              f"({need} CPUs, {cfg.simulation.gpus_per_site:g} GPUs: simulation.cpus_per_site / gpus_per_site)")
    console.print(f"Ray cluster {address}: {len(info.nodes)} nodes, {info.cpus:g} CPUs, {info.gpus:g} GPUs; up to "
                  f"{int(info.cpus // need)} virtual sites at a time")


def _distill_state(cfg: ScenarioConfig, scenario_path: Path, state_dir: str | Path | None, console: Console) -> str | Path | None:
    """Check the teacher before anything starts (one ConfigError line); under DP the sites keep the teacher run's ledgers.

    A virtual site of the student run is the same site as in the teacher run (same data, seed and
    partition), so its distillation rounds spend from the same budget: by default the student
    run uses the teacher run's site state (TEACHER/sites) unless --state-dir names another.
    """
    from fedseek.data.scenario_data import scenario_shapes
    from fedseek.serving.teacher import DistillError, check_config

    assert cfg.distill is not None
    try:
        _, shaped = scenario_shapes(cfg)
        schema = shaped.schema()
        teacher = check_config(cfg.distill, cfg.model, tuple(shaped.input_shape), int(shaped.num_classes),
                               features=schema.features, classes=schema.classes)
    except (DistillError, ValueError) as exc:
        raise ConfigError(f"{scenario_path}: {exc}") from None
    if state_dir is not None or not (cfg.privacy and cfg.privacy.enabled):
        return state_dir
    shared = teacher.run_dir / "sites"
    if shared.is_dir():
        console.print(f"[yellow]note:[/] distillation spends from the same privacy budgets as the teacher's training: the sites "
                      f"keep the teacher run's ledgers ({shared}); give --state-dir to use others")
        return shared
    console.print(f"[yellow]note:[/] {shared} does not exist: if the teacher run used --state-dir, give the same one here so "
                  "the sites' ledgers count the teacher's rounds too")
    return None


def horizon_note(cfg: ScenarioConfig) -> str | None:
    """Under DP, what a mismatch between the scenario's rounds and the sites' planning horizon does (None: they agree)."""
    pol = cfg.privacy
    if pol is None or not pol.enabled or pol.noise_multiplier is not None or pol.target_epsilon_per_round is not None:
        return None
    if pol.planning_rounds < cfg.rounds:
        return (f"the sites plan their budget over privacy.planning_rounds {pol.planning_rounds} but the scenario runs {cfg.rounds} "
                f"rounds: their budgets are spent by round {pol.planning_rounds} and later rounds are refused or much noisier "
                f"(set planning_rounds: {cfg.rounds} to spread the budget over the run)")
    if pol.planning_rounds > cfg.rounds:
        return (f"the sites plan their budget over privacy.planning_rounds {pol.planning_rounds} but the scenario runs {cfg.rounds} "
                f"rounds: the run spends about {cfg.rounds}/{pol.planning_rounds} of it, with more noise than needed "
                f"(set planning_rounds: {cfg.rounds} to use it all)")
    return None


def _note_horizon(cfg: ScenarioConfig, console: Console) -> None:
    note = horizon_note(cfg)
    if note:
        console.print(f"[yellow]note:[/] {note}")


def _warn_spent_ledgers(cfg: ScenarioConfig, state_root: Path, console: Console) -> None:
    """Sites keep their privacy ledgers across runs: say so before a re-run meets refusals."""
    if not (cfg.privacy and cfg.privacy.enabled) or not state_root.is_dir():
        return
    from fedseek.privacy import LEDGER_FILE  # imports Opacus: only when the scenario uses DP

    spent = []
    for path in state_root.glob(f"*/{LEDGER_FILE}"):
        try:
            spent.append(float(json.loads(path.read_text()).get("epsilon", 0.0)))
        except (OSError, ValueError):
            continue
    if spent and max(spent) > 0:
        console.print(f"[yellow]note:[/] {len(spent)} site ledgers in {state_root} already hold spent privacy "
                      f"(max epsilon {max(spent):.3f} of {cfg.privacy.epsilon_budget:g}); sites refuse rounds past their budget. "
                      f"Use a fresh --out or --state-dir to simulate from zero.")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
