"""The command line's output consoles (stderr: stdout stays for machine-readable output such as --json)."""

from __future__ import annotations

from rich.console import Console

#: errors, progress and tables of `fedseek simulate`, reports
err = Console(stderr=True)
#: deployment messages are one line each (operators grep logs): no wrapping at the terminal width
dep = Console(stderr=True, soft_wrap=True)
