"""`fedseek simulate`: N virtual sites through Flower's own simulation engine (Ray).

It starts a private simulation SuperLink on a free loopback port (its state and logs in
OUT/.flwr), submits the fedseek Flower App with the scenario path in the run config, shows
per-round progress from OUT/metrics.jsonl, and on exit (normal, failure or Ctrl-C) stops
every process it started. The exit code reflects the run's real status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from fedseek.config import ScenarioConfig, load_scenario
from fedseek.ops.flower_control import ControlClient, flower_env, flwr_bin, submit_run, write_connection
from fedseek.ops.follow import RunError, follow_run, print_summary, tail
from fedseek.ops.processes import ProcessTree, free_port, start_process, wait_for_port

CONNECTION = "fedseek-sim"


class SimulationError(RunError):
    """The simulation did not complete; the message says why and where the logs are."""


def app_dir() -> Path:
    """The Flower App root (pyproject.toml with [tool.flwr.app]) next to the fedseek package."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists() or not (root / "server" / "app.py").exists():
        raise SimulationError(f"the fedseek Flower App was not found at {root}: install fedseek from a source checkout (pip install -e .)")
    return root


_tail = tail


def simulate(
    scenario_path: str | Path,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    state_dir: str | Path | None = None,
    timeout_s: float | None = None,
    on_round: Callable[[dict], None] | None = None,
    resume: bool = False,
) -> dict:
    """Run a scenario to completion; returns summary.json's content or raises SimulationError."""
    console = console or Console(stderr=True)
    scenario_path = Path(scenario_path).resolve()
    cfg: ScenarioConfig = load_scenario(scenario_path)  # ConfigError surfaces before anything starts
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    if not resume:
        for stale in ("metrics.jsonl", "audit.jsonl"):
            (out / stale).unlink(missing_ok=True)
    flwr_home = out / ".flwr"
    env = flower_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
    log_path = out / "flower.log"
    run_log_path = out / "run.log"
    timeout_s = timeout_s or (cfg.round_timeout_s * cfg.rounds + cfg.simulation.node_wait_s + 300)

    _warn_spent_ledgers(cfg, Path(state_dir) if state_dir else out / "sites", console)
    trees: list[ProcessTree] = []
    client: ControlClient | None = None
    run_id: int | None = None
    t0 = time.time()
    with open(log_path, "ab") as log_fh, open(run_log_path, "ab") as run_log_fh:
        try:
            console.print(f"[bold]fedseek[/] simulate [cyan]{cfg.name}[/]: {cfg.num_sites} sites, {cfg.rounds} rounds, "
                          f"{cfg.data.dataset}, {cfg.strategy.name}" + (f", DP eps<={cfg.privacy.epsilon_budget:g}" if cfg.privacy and cfg.privacy.enabled else ""))
            superlink = start_process(
                [flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--database", str(flwr_home / "state.db"),
                 "--disable-runtime-dependency-installation"],
                env=env, log=log_fh, name="superlink",
            )
            trees.append(superlink)
            try:
                wait_for_port("127.0.0.1", port, 60, superlink.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise SimulationError(f"the simulation SuperLink did not start ({exc}); see {log_path}:\n{_tail(log_path)}") from None
            run_config: dict = {"config-path": str(scenario_path), "out-dir": str(out), "config-kind": "scenario", "resume": resume}
            if state_dir is not None:
                run_config["state-dir"] = str(Path(state_dir).resolve())
            ray_cpus = cfg.simulation.ray_cpus or max(1, _cores())
            fed = {"num-supernodes": cfg.num_sites, "client-resources-num-cpus": cfg.simulation.cpus_per_site, "init-args-num-cpus": ray_cpus}
            try:
                run_id = submit_run(app_dir(), CONNECTION, env, run_config, fed)
            except RuntimeError as exc:
                raise SimulationError(str(exc)) from None
            logs = start_process([flwr_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env, log=run_log_fh, name="flwr-log")
            trees.append(logs)
            client = ControlClient(flwr_home, CONNECTION)
            status = _follow(cfg, out, client, run_id, superlink, console, timeout_s, on_round)
            if not status.ok:
                raise SimulationError(
                    f"run {run_id} ended {status}" + (f": {status.details}" if status.details else "")
                    + f"\n--- last lines of {run_log_path} ---\n{_tail(run_log_path)}"
                )
            summary_path = out / "summary.json"
            if not summary_path.exists():
                raise SimulationError(f"run {run_id} completed but wrote no summary.json; see {run_log_path}")
            import json

            summary = json.loads(summary_path.read_text())
            print_summary(console, summary, out, time.time() - t0)
            return summary
        except KeyboardInterrupt:
            if client is not None and run_id is not None:
                try:
                    client.stop(run_id)
                except Exception:  # noqa: BLE001
                    pass
            raise
        finally:
            if client is not None:
                client.close()
            for tree in reversed(trees):
                tree.stop()


def _warn_spent_ledgers(cfg: ScenarioConfig, state_root: Path, console: Console) -> None:
    """Sites keep their privacy ledgers across runs: say so before a re-run meets refusals."""
    import json

    if not (cfg.privacy and cfg.privacy.enabled) or not state_root.is_dir():
        return
    spent = []
    for path in state_root.glob("*/privacy_ledger.json"):
        try:
            spent.append(float(json.loads(path.read_text()).get("epsilon", 0.0)))
        except (OSError, ValueError):
            continue
    if spent and max(spent) > 0:
        console.print(f"[yellow]note:[/] {len(spent)} site ledgers in {state_root} already hold spent privacy "
                      f"(max epsilon {max(spent):.3f} of {cfg.privacy.epsilon_budget:g}); sites refuse rounds past their budget. "
                      f"Use a fresh --out or --state-dir to simulate from zero.")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _follow(cfg: ScenarioConfig, out: Path, client: ControlClient, run_id: int, superlink: ProcessTree,
            console: Console, timeout_s: float, on_round: Callable[[dict], None] | None):
    """Follow the run (shared logic in fedseek.ops.follow), watching our own SuperLink process tree."""

    def alive() -> str | None:
        superlink.sample()
        if superlink.proc.poll() is not None:
            return f"the SuperLink exited with code {superlink.proc.returncode}; see {out / 'flower.log'}"
        return None

    try:
        return follow_run(out, client, run_id, rounds=cfg.rounds, sites=cfg.num_sites, console=console,
                          timeout_s=timeout_s, on_round=on_round, check_alive=alive, site_word="virtual sites")
    except RunError as exc:
        raise SimulationError(str(exc)) from None
