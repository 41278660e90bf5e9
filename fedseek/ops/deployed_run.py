"""`fedseek run --config server/coordinator.yaml`: a federation run on the deployed coordinator and its sites.

The coordinator (fedseek.ops.coordinator) must be running; the run is submitted with the
coordinator config through the shared launcher (as `fedseek simulate` submits its scenario)
and fails unless it ends `finished:completed` with a completed summary. On Ctrl-C or SIGTERM the
run is stopped on the coordinator; the coordinator and the sites, long-lived daemons, keep running.

Flower does not resume a run after a SuperLink crash (the run ends `finished:failed`), but the
coordinator checkpoints every round in OUT/checkpoint: once the coordinator is started again
(the sites reconnect by themselves), `fedseek run --resume` submits a new run that continues from
that checkpoint, exactly as `fedseek simulate --resume` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from fedseek.config import CoordinatorConfig, load_coordinator
from fedseek.ops.coordinator import admin_address, admin_host, coordinator_paths, write_admin_connection
from fedseek.ops.daemons import DeployError, running_pidfile
from fedseek.ops.launcher import Launcher, RunRequest, prepare_out, report
from fedseek.ops.processes import port_open
from fedseek.ops.registration import CONNECTION
from fedseek.outputs.schema import MetricsRow


def _watch(cfg: CoordinatorConfig) -> Callable[[], str | None]:
    """A liveness check on the coordinator this command found running (one started by other means is not watched)."""
    tracked = running_pidfile(coordinator_paths(cfg).pidfile)

    def alive() -> str | None:
        if tracked is not None and not tracked.running():
            return f"the coordinator (pid {tracked.pid}) exited; see {cfg.superlink.log_file}"
        return None

    return alive


def run_federation(
    config_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    console: Console | None = None,
    timeout_s: float | None = None,
    on_round: Callable[[MetricsRow], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Submit the fedseek app to the running coordinator and follow it to its end; returns summary.json's content.

    `resume`: continue from OUT/checkpoint (metrics and audit kept). Raises DeployError when no
    coordinator runs, RunError unless the run ends finished:completed with a completed summary.
    """
    console = console or Console(stderr=True)
    config_path = Path(config_path).resolve()
    cfg = load_coordinator(config_path)
    t = cfg.task
    if t.test_file:  # the coordinator's own test table, read and checked as its ServerApp will: one line before submission
        from fedseek.data import load_table

        try:
            load_table(t.test_file, str(t.label_column), t.feature_columns, standardize=t.standardize, classes=t.classes,
                       preprocessing=t.preprocessing)
        except ValueError as exc:  # DataError included
            raise DeployError(f"{config_path}: task.test_file: {exc}", exit_code=2) from None
    if cfg.distill is not None:  # the teacher and the student's size: one line before submission
        from fedseek.ops.coordinator import _task_shape
        from fedseek.serving.teacher import DistillError, check_config

        try:
            check_config(cfg.distill, cfg.model, *_task_shape(cfg))
        except DistillError as exc:
            raise DeployError(f"{config_path}: {exc}", exit_code=2) from None
    paths = coordinator_paths(cfg)
    if running_pidfile(paths.pidfile) is None and not port_open(admin_host(cfg), cfg.superlink.port):
        raise DeployError(f"the coordinator is not running on {admin_address(cfg)}: fedseek coordinator start --config {config_path}")
    out = prepare_out(Path(out_dir).resolve() if out_dir else Path(cfg.out_dir), resume=resume)
    write_admin_connection(cfg, paths)
    again = f"fedseek run --config {config_path}" + (f" --out {out}" if out_dir else "")
    req = RunRequest(flwr_home=paths.flwr_home, connection=CONNECTION, out=out,
                     run_config={"config-path": str(config_path), "out-dir": str(out), "config-kind": "coordinator", "resume": resume},
                     rounds=cfg.rounds, sites=int(cfg.expected_sites or 1),
                     timeout_s=timeout_s or (cfg.node_wait_s + cfg.round_timeout_s * cfg.rounds + 300),
                     quiet=True, announce=True, check_alive=_watch(cfg),
                     metrics=cfg.metrics, run_name=cfg.name, watermark=cfg.watermark.enabled,
                     resume_hint=f"start the coordinator again (fedseek coordinator start --config {config_path}), "
                                 f"then continue from the last checkpoint with `{again} --resume`")
    t0 = time.time()
    console.print(f"[bold]fedseek[/] run [cyan]{cfg.name}[/] on {admin_address(cfg)}: {cfg.expected_sites} sites expected, "
                  f"{cfg.rounds} rounds, {cfg.strategy.name}" + (f" (resuming from {out / 'checkpoint'})" if resume else ""))
    launcher = Launcher(req, console)
    try:
        outcome = launcher.follow(on_round)
    finally:
        launcher.close()
    return report(console, outcome, out, t0)
