"""`fedseek simulate`: N virtual sites through Flower's own simulation engine (Ray).

It starts a private simulation SuperLink on a free loopback port (its state and logs in
OUT/.flwr), submits the fedseek Flower App with the scenario path in the run config, shows
per-round progress from OUT/metrics.jsonl, and on exit (normal, failure or Ctrl-C) stops
every process it started. The exit code reflects the run's real status.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedseek.config import ScenarioConfig, load_scenario
from fedseek.flower_control import ControlClient, flower_env, flwr_bin, submit_run, write_connection
from fedseek.processes import ProcessTree, free_port, start_process, wait_for_port
from fedseek.telemetry import read_metrics

CONNECTION = "fedseek-sim"


class SimulationError(RuntimeError):
    """The simulation did not complete; the message says why and where the logs are."""


def app_dir() -> Path:
    """The Flower App root (pyproject.toml with [tool.flwr.app]) next to the fedseek package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists() or not (root / "server" / "app.py").exists():
        raise SimulationError(f"the fedseek Flower App was not found at {root}: install fedseek from a source checkout (pip install -e .)")
    return root


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


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
            _print_summary(console, summary, out, time.time() - t0)
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
    """Poll the run status, show one progress line per round, stop at the end status."""
    deadline = time.monotonic() + timeout_s
    seen = len(read_metrics(out / "metrics.jsonl"))  # rows of an earlier, resumed run are not news
    status = client.status(run_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"starting {cfg.num_sites} virtual sites", total=cfg.rounds)
        while True:
            superlink.sample()
            rows = read_metrics(out / "metrics.jsonl")
            for row in rows[seen:]:
                c = row.get("central", {})
                extra = ""
                eps = [s.get("epsilon") for s in row.get("sites", {}).values() if s.get("epsilon") is not None]
                if eps:
                    extra = f" max eps {max(eps):.3f}"
                bad = row.get("rejected", 0) + row.get("refused", 0) + row.get("failed", 0) + row.get("timed_out", 0)
                console.print(f"round {row['round']:>3}/{cfg.rounds}  accuracy {c.get('accuracy', float('nan')):.4f}  "
                              f"loss {c.get('loss', float('nan')):.4f}  sites {row.get('accepted', 0)}/{row.get('sampled', 0)}"
                              f"{'  excluded/failed ' + str(bad) if bad else ''}{extra}  {row.get('round_seconds', 0):.1f}s")
                progress.update(task, completed=row["round"], description=f"accuracy {c.get('accuracy', float('nan')):.4f}")
                if on_round:
                    on_round(row)
            seen = len(rows)
            if status.finished:
                return status
            if superlink.proc.poll() is not None:
                raise SimulationError(f"the SuperLink exited with code {superlink.proc.returncode}; see {out / 'flower.log'}")
            if time.monotonic() > deadline:
                client.stop(run_id)
                raise SimulationError(f"run {run_id} did not finish within {timeout_s:.0f}s (stopped)")
            if status.status == "running" and seen == 0:
                progress.update(task, description=f"round 1 ({cfg.num_sites} sites)")
            time.sleep(1.0)
            status = client.status(run_id)


def _print_summary(console: Console, s: dict, out: Path, wall: float) -> None:
    t = Table(title=f"fedseek run {s.get('name')}", show_header=False)
    final = s.get("final", {})
    t.add_row("final accuracy", f"{final.get('accuracy', float('nan')):.4f}")
    if "auc" in final:
        t.add_row("final ROC AUC", f"{final['auc']:.4f}")
    t.add_row("rounds", f"{s.get('rounds_completed')}/{s.get('rounds')}")
    priv = s.get("privacy") or {}
    if priv.get("enabled"):
        t.add_row("max epsilon (per site)", f"{priv.get('max_epsilon') or 0:.4f} of {priv.get('epsilon_budget')} (delta {priv.get('delta')}, {priv.get('accountant')})")
    t.add_row("rejected updates", str(s.get("rejected_updates", 0)))
    t.add_row("refused rounds", str(s.get("refused_rounds", 0)))
    t.add_row("bytes up / down", f"{s.get('bytes_up', 0):,} / {s.get('bytes_down', 0):,}")
    t.add_row("wall time", f"{wall:.1f}s")
    t.add_row("outputs", str(out))
    console.print(t)
