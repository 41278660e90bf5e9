"""Following a submitted run to its real end status, with one progress line per round.

Shared by `fedseek simulate` and `fedseek run` (deployment): both read OUT/metrics.jsonl as
the ServerApp appends it and poll the run status through Flower's Control API, because
`flwr run --stream` exits 0 even when the ServerApp fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedseek.ops.flower_control import ControlClient, RunStatus
from fedseek.outputs.store import read_metrics


class RunError(RuntimeError):
    """A run did not complete; the message says why and where the logs are."""


def tail(path: Path, n: int = 25) -> str:
    """The last `n` lines of a log file ('' if unreadable), for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def round_line(row: dict[str, Any], rounds: int) -> str:
    """One progress line for a metrics.jsonl row."""
    c = row.get("central", {})
    extra = ""
    eps = [s.get("epsilon") for s in row.get("sites", {}).values() if s.get("epsilon") is not None]
    if eps:
        extra = f" max eps {max(eps):.3f}"
    bad = row.get("rejected", 0) + row.get("refused", 0) + row.get("failed", 0) + row.get("timed_out", 0)
    return (f"round {row['round']:>3}/{rounds}  accuracy {c.get('accuracy', float('nan')):.4f}  "
            f"loss {c.get('loss', float('nan')):.4f}  sites {row.get('accepted', 0)}/{row.get('sampled', 0)}"
            f"{'  excluded/failed ' + str(bad) if bad else ''}{extra}  {row.get('round_seconds', 0):.1f}s")


def follow_run(
    out: Path,
    client: ControlClient,
    run_id: int,
    *,
    rounds: int,
    sites: int,
    console: Console,
    timeout_s: float,
    on_round: Callable[[dict], None] | None = None,
    check_alive: Callable[[], str | None] | None = None,
    site_word: str = "sites",
) -> RunStatus:
    """Poll the run status, print one progress line per round, return the final status.

    `check_alive` is called every poll; a non-None return (e.g. "the SuperLink exited") aborts
    with RunError. On timeout the run is stopped and RunError raised.
    """
    deadline = time.monotonic() + timeout_s
    seen = len(read_metrics(out / "metrics.jsonl"))  # rows of an earlier, resumed run are not news
    status = client.status(run_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"starting {sites} {site_word}", total=rounds)
        while True:
            dead = check_alive() if check_alive is not None else None
            rows = read_metrics(out / "metrics.jsonl")
            for row in rows[seen:]:
                console.print(round_line(row, rounds))
                c = row.get("central", {})
                progress.update(task, completed=row["round"], description=f"accuracy {c.get('accuracy', float('nan')):.4f}")
                if on_round:
                    on_round(row)
            seen = len(rows)
            if status.finished:
                return status
            if dead is not None:
                raise RunError(dead)
            if time.monotonic() > deadline:
                client.stop(run_id)
                raise RunError(f"run {run_id} did not finish within {timeout_s:.0f}s (stopped)")
            if status.status == "running" and seen == 0:
                progress.update(task, description=f"round 1 ({sites} sites)")
            time.sleep(1.0)
            status = client.status(run_id)


def print_summary(console: Console, s: dict, out: Path, wall: float) -> None:
    """The end-of-run table (accuracy, rounds, epsilon, rejections, bytes, wall time, outputs)."""
    t = Table(title=f"fedseek run {s.get('name')}", show_header=False)
    final = s.get("final", {})
    t.add_row("final accuracy", f"{final.get('accuracy', float('nan')):.4f}")
    if "auc" in final:
        t.add_row("final ROC AUC", f"{final['auc']:.4f}")
    t.add_row("rounds", f"{s.get('rounds_completed')}/{s.get('rounds')}")
    priv = s.get("privacy") or {}
    if priv.get("enabled"):
        t.add_row("max epsilon (per site)", f"{priv.get('max_epsilon') or 0:.4f} of {priv.get('epsilon_budget')} (delta {priv.get('delta')}, {priv.get('accountant')})")
    elif priv.get("max_epsilon") is not None:
        t.add_row("max epsilon (per site)", f"{priv['max_epsilon']:.4f} (as reported by the sites)")
    t.add_row("rejected updates", str(s.get("rejected_updates", 0)))
    t.add_row("refused rounds", str(s.get("refused_rounds", 0)))
    t.add_row("bytes up / down", f"{s.get('bytes_up', 0):,} / {s.get('bytes_down', 0):,}")
    comp = s.get("compression") or {}
    if comp.get("codec") not in (None, "none") and comp.get("ratio_up"):
        t.add_row("uplink compression", f"{comp['codec']}: {comp['ratio_up']:.1f}x fewer bytes than dense fp32")
    if s.get("sparsity"):
        t.add_row("model sparsity", f"{s['sparsity']:.1%}")
    wm = s.get("watermark") or {}
    if wm:
        t.add_row("watermark", f"{wm.get('matches')}/{wm.get('n')} triggers, p = {wm.get('p_value', 1.0):.3g}")
    if s.get("stop_reason"):
        t.add_row("stopped early", str(s["stop_reason"]))
    t.add_row("wall time", f"{wall:.1f}s")
    t.add_row("outputs", str(out))
    try:
        from fedseek.outputs.report import write_report

        t.add_row("report", str(write_report(out)))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not fail a finished run
        t.add_row("report", f"not written ({type(exc).__name__}: {exc})")
    console.print(t)
