"""Commands for the long-lived daemons: `coordinator start|stop|status` and `site start|stop`.

Both start their daemon detached (it outlives the command) and return; errors are one line on
stderr with DeployError's exit code (2 = fix the config, 1 = it did not work).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedseek.ops.consoles import dep

coordinator_app = typer.Typer(help="The coordinator service: Flower SuperLink over TLS with site keys.", no_args_is_help=True)
site_app = typer.Typer(help="A site daemon: Flower SuperNode with the site's key and data.", no_args_is_help=True)

CoordinatorYaml = Annotated[str, typer.Option("--config", help="Coordinator YAML.")]
SiteYaml = Annotated[str, typer.Option("--config", help="Site YAML, e.g. clients/sites/hospital-a.yaml.")]


def _deploy_error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 1))


@coordinator_app.command("start")
def coordinator_start(config: CoordinatorYaml = "server/coordinator.yaml") -> int:
    """Start the SuperLink (detached) and register the allowed sites' keys."""
    from fedseek.config import load_coordinator
    from fedseek.ops.coordinator import start_coordinator
    from fedseek.ops.daemons import DeployError

    cfg = load_coordinator(config)
    try:
        problems = start_coordinator(cfg, dep)
    except DeployError as exc:
        return _deploy_error(exc)
    for p in problems:
        dep.print(f"[yellow]warning:[/] {p}", highlight=False)
    if any(not p.startswith("node ") for p in problems):
        print("error: the coordinator is running, but some allowed sites are not registered", file=sys.stderr)
        return 1
    return 0


@coordinator_app.command("stop")
def coordinator_stop(config: CoordinatorYaml = "server/coordinator.yaml") -> int:
    """Stop the SuperLink and everything it started."""
    from fedseek.config import load_coordinator
    from fedseek.ops.coordinator import stop_coordinator
    from fedseek.ops.daemons import DeployError

    cfg = load_coordinator(config)
    try:
        pf = stop_coordinator(cfg)
    except DeployError as exc:
        return _deploy_error(exc)
    print(f"coordinator stopped (pid {pf.pid})" if pf else "coordinator was not running")
    return 0


def _print_status(st: dict[str, Any]) -> None:
    running = f"running (pid {st['pid']})" if st["running"] else "not running"
    print(f"coordinator {running} on {st['address']}, database {st['database']}")
    if "gateway" in st:
        g = st["gateway"]
        print(f"gateway {'running (pid ' + str(g['pid']) + ')' if g['running'] else 'NOT running'} on {g['address']}")
    for s in st["sites"]:
        print(f"  site {s['name']:<20} {s['status']:<15} node {s['node_id'] or '-'}")
    for n in st["other_nodes"]:
        print(f"  other node {n['node_id']} ({n['name'] or 'no name'}) {n['status']}: not in sites")


@coordinator_app.command("status")
def coordinator_status(
    config: CoordinatorYaml = "server/coordinator.yaml",
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> int:
    """Is it running; which sites are registered / online."""
    from fedseek.config import load_coordinator
    from fedseek.ops.coordinator import coordinator_status as status
    from fedseek.ops.daemons import DeployError

    cfg = load_coordinator(config)
    try:
        st = status(cfg)
    except DeployError as exc:
        return _deploy_error(exc)
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        _print_status(st)
    return 0 if st["running"] else 1


@site_app.command("start")
def site_start(
    config: SiteYaml,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the coordinator to accept the site.")] = 30.0,
) -> int:
    """Check the site config, keys and data, then start the SuperNode (detached)."""
    from fedseek.config import load_site
    from fedseek.ops.daemons import DeployError
    from fedseek.ops.site_daemon import start_site

    cfg = load_site(config)
    try:
        start_site(cfg, Path(config), dep, wait_s=wait)
    except DeployError as exc:
        return _deploy_error(exc)
    return 0


@site_app.command("stop")
def site_stop(config: SiteYaml) -> int:
    """Stop the site's SuperNode."""
    from fedseek.config import load_site
    from fedseek.ops.daemons import DeployError
    from fedseek.ops.site_daemon import stop_site

    cfg = load_site(config)
    try:
        pf = stop_site(cfg)
    except DeployError as exc:
        return _deploy_error(exc)
    print(f"site {cfg.name} stopped (pid {pf.pid})" if pf else f"site {cfg.name} was not running")
    return 0


def register(app: typer.Typer) -> None:
    """Add the coordinator and site groups to the root command."""
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(site_app, name="site")
