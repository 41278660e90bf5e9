"""The `fedseek` command: simulate, coordinator/site daemons and deployed runs, reports, certs, watermark.

The command tree is built with typer (fedseek.ops.cli_runs, cli_daemons, cli_keys add their
commands); this module holds the root (`fedseek --version`) and the one place that turns
outcomes into exit codes: 0 success, 1 the run failed, 2 bad configuration or usage (one
line, no traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). On either signal every
process the command started is stopped first (fedseek.ops.signals).
"""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer

from fedseek.ops import cli_daemons, cli_keys, cli_privacy, cli_runs, cli_serve, signals
from fedseek.ops.consoles import err

app = typer.Typer(
    name="fedseek",
    help="Privacy-preserving federated learning on Flower + Opacus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def installed_version() -> str:
    """The installed fedseek distribution's version (importlib.metadata), or the package's own if not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedseek")
    except PackageNotFoundError:
        from fedseek import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"fedseek {installed_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed fedseek version and exit.")] = False,
) -> None:
    """Privacy-preserving federated learning on Flower + Opacus."""


cli_runs.register(app)
cli_daemons.register(app)
cli_keys.register(app)
cli_serve.register(app, cli_keys.watermark_app)
cli_privacy.register(cli_runs.privacy_app)  # verify, raise-budget, show next to `privacy report`


def _interrupted(signum: int) -> int:
    import signal

    err.print(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}; stopped all processes")
    return signals.signal_exit_code(signum)


def _run(argv: list[str] | None) -> int:
    """Run the command; its exit code (usage errors 2, bad configuration 2, the command's own code otherwise)."""
    from fedseek.config import ConfigError

    try:
        return int(app(args=argv, prog_name="fedseek", standalone_mode=False) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        return int(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):  # main() asks `signals` which one (typer returns 130 itself)
        return signals.EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedseek` console script: run one command, return its exit code."""
    try:
        with signals.handle_termination():
            code = _run(argv)
    except KeyboardInterrupt:  # a signal in the instant between the command's end and the handlers' restore
        code = signals.EXIT_INTERRUPTED
    signum = signals.received()
    return _interrupted(signum) if signum is not None else code


if __name__ == "__main__":
    sys.exit(main())
