"""Commands that run a federation or use what a run left: `simulate`, `run`, `report`, `predict`, `privacy report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseek.ops.consoles import dep, err

privacy_app = typer.Typer(help="Privacy ledgers.", no_args_is_help=True)


def simulate(
    scenario: Annotated[str, typer.Argument(help="Scenario YAML.")] = "simulations/hospitals.yaml",
    out: Annotated[str, typer.Option("--out", help="Output directory.")] = "runs/latest",
    state_dir: Annotated[str | None,
                         typer.Option("--state-dir", help="Sites' persistent state (privacy ledgers); default OUT/sites.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Overall limit in seconds.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint after a crash.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Run on this existing Ray cluster (HOST:PORT of its head, "
                                                    "or auto); fedseek neither starts nor stops it.")] = None,
) -> int:
    """Run a scenario with N virtual sites (Flower simulation engine)."""
    from fedseek.ops.launcher import AlreadyFinished
    from fedseek.ops.simulate import SimulationError
    from fedseek.ops.simulate import simulate as run_simulation

    try:
        run_simulation(scenario, out, state_dir=state_dir, timeout_s=timeout, resume=resume, ray_address=ray_address)
    except AlreadyFinished as exc:
        err.print(str(exc), highlight=False)
        return 0
    except SimulationError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 1
    return 0


def run(
    config: Annotated[str, typer.Option("--config", help="Coordinator YAML.")] = "server/coordinator.yaml",
    out: Annotated[str | None, typer.Option("--out", help="Output directory (default: the config's out_dir).")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Overall limit in seconds.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint (e.g. after a coordinator crash).")] = False,
) -> int:
    """Run the federation on the deployed coordinator and its sites."""
    from fedseek.ops.daemons import DeployError
    from fedseek.ops.deployed_run import run_federation
    from fedseek.ops.follow import RunError
    from fedseek.ops.launcher import AlreadyFinished

    try:
        run_federation(config, out, console=dep, timeout_s=timeout, resume=resume)
    except AlreadyFinished as exc:
        print(str(exc), file=sys.stderr)
        return 0
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunError as exc:
        dep.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 1
    return 0


def report(run_dir: Annotated[str, typer.Argument(help="A run's output directory.")]) -> int:
    """Write RUN_DIR/report.html (self-contained, with plots)."""
    from fedseek.outputs.report import write_report

    if not Path(run_dir).is_dir():
        print(f"error: {run_dir} is not a run directory", file=sys.stderr)
        return 2
    print(write_report(Path(run_dir)))
    return 0


def predict(
    model: Annotated[str, typer.Option("--model", help="A finished run's directory (model.pt + model.json).")],
    input: Annotated[str, typer.Option("--input", help="Table to predict (.csv/.parquet) with the model's feature columns.")],
    out: Annotated[str, typer.Option("--out", help="CSV to write: the input rows + predicted + prob_<class>.")],
) -> int:
    """Apply a run's model to a table, with the preprocessing its model card names."""
    from fedseek.ops.predict import PredictError, predict_table

    try:
        n = predict_table(model, input, out)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} rows predicted: {out}", file=sys.stderr)
    return 0


def _ledger_table(data: dict[str, Any], path: Path) -> Any:
    from rich.table import Table

    t = Table(title=f"privacy ledger: {data.get('site') or path.parent.name}  ({path})")
    for col in ("round", "run", "noise", "sample rate", "steps", "epsilon after"):
        t.add_column(col, justify="right")
    for r in data.get("rounds", []):
        t.add_row(str(r["server_round"]), str(r["run_id"]), f"{r['noise_multiplier']:.4f}", f"{r['sample_rate']:.4f}",
                  str(r["steps"]), f"{r['epsilon_after']:.4f}")
    return t


@privacy_app.command("report")
def privacy_report(
    state_dir: Annotated[str, typer.Argument(help="A site's state directory, or a directory of them.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the ledgers as JSON.")] = False,
) -> int:
    """Print a site's privacy ledger (or all under a directory)."""
    from rich.console import Console

    from fedseek.privacy import LEDGER_FILE

    root = Path(state_dir)
    ledgers = [root / LEDGER_FILE] if (root / LEDGER_FILE).exists() else sorted(root.glob(f"*/{LEDGER_FILE}"))
    if not ledgers:
        err.print(f"error: no {LEDGER_FILE} in {root} or its sub-directories")
        return 2
    out = Console()
    reports = []
    for path in ledgers:
        data = json.loads(path.read_text())
        reports.append(data)
        if as_json:
            continue
        out.print(_ledger_table(data, path))
        out.print(
            f"epsilon spent {data['epsilon']:.4f} of budget {data['epsilon_budget']:g} at delta {data['delta']:g} "
            f"({data['accountant']} accountant); {sum(h[2] for h in data['history'])} DP-SGD steps; "
            f"{len(data.get('refusals', []))} refused round(s)"
        )
    if as_json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    return 0


def register(app: typer.Typer) -> None:
    """Add simulate, run, report and the privacy group to the root command."""
    app.command("simulate")(simulate)
    app.command("run")(run)
    app.command("report")(report)
    app.command("predict")(predict)
    app.add_typer(privacy_app, name="privacy")
