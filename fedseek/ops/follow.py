"""Following a submitted run to its real end status, with one progress line per round.

Shared by `fedseek simulate` and `fedseek run` (through fedseek.ops.launcher): OUT/metrics.jsonl
is read through the run schema (fedseek.outputs.schema) as the ServerApp appends it, and the
run status is polled through Flower's Control API, because `flwr run --stream` exits 0 even
when the ServerApp fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedseek.ops.flower_control import ControlClient, RunStatus
from fedseek.outputs.schema import MetricsRow, RunSummary, SchemaError, read_rows

#: Seconds between two status polls. The end of a run is seen sooner: the launcher's log stream ends with the
#: run and wakes the loop (`wake`); polling faster would only cost CPU on the cores the run needs.
POLL_S = 0.5
#: Poll interval once `wake` is set (the run's log ended: its status changes any moment).
WOKEN_POLL_S = 0.05


#: Consecutive failed status polls before the SuperLink counts as lost (a busy SuperLink may miss one).
STATUS_RETRIES = 5


class RunError(RuntimeError):
    """A run did not complete; the message says why and where the logs are."""


class LostSuperLink(RunError):
    """The SuperLink stopped answering (or its process exited) while the run was followed; the message is one line."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:200]}"


def poll_status(client: ControlClient, run_id: int, wake: threading.Event | None = None) -> RunStatus:
    """The run's status; retried a few times, then LostSuperLink (one line) instead of the HTTP client's traceback."""
    for attempt in range(STATUS_RETRIES):
        try:
            return client.status(run_id)
        except Exception as exc:  # noqa: BLE001 - connection refused/reset, TLS, HTTP 5xx: whichever the dying SuperLink gives
            if attempt == STATUS_RETRIES - 1:
                raise LostSuperLink(f"lost the SuperLink while following run {run_id} ({_one_line(exc)})") from None
            _pause(wake)
    raise AssertionError("unreachable")


def tail(path: Path, n: int = 25) -> str:
    """The last `n` lines of a log file ('' if unreadable), for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def round_line(row: MetricsRow, rounds: int) -> str:
    """One progress line for a metrics.jsonl row."""
    c = row.central
    eps = [s.epsilon for s in row.sites.values() if s.epsilon is not None]
    extra = f" max eps {max(eps):.3f}" if eps else ""
    bad = row.rejected + row.refused + row.failed + row.timed_out
    return (f"round {row.round:>3}/{rounds}  {_quality(c)}  sites {row.accepted}/{row.sampled}"
            f"{'  excluded/failed ' + str(bad) if bad else ''}{extra}  {row.round_seconds:.1f}s")


def _quality(c: dict[str, float | None]) -> str:
    """accuracy and loss, or R² and RMSE for a regression."""
    if "r2" in c:
        return f"R² {_num(c.get('r2')):.4f}  RMSE {_num(c.get('rmse')):.4g}"
    return f"accuracy {_num(c.get('accuracy')):.4f}  loss {_num(c.get('loss')):.4f}"


def _short(c: dict[str, float | None]) -> str:
    return f"R² {_num(c.get('r2')):.4f}" if "r2" in c else f"accuracy {_num(c.get('accuracy')):.4f}"


class MetricsTail:
    """New rows of a growing metrics.jsonl, re-read only when the file changed."""

    def __init__(self, path: Path) -> None:
        """Rows already in the file (an earlier, resumed run) are not news."""
        self.path = path
        self._stamp = self._stat()
        self.seen = len(self._read())

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _read(self) -> list[MetricsRow]:
        try:
            return read_rows(self.path)
        except SchemaError as exc:
            raise RunError(str(exc)) from None

    def new_rows(self) -> list[MetricsRow]:
        """Rows appended since the last call."""
        stamp = self._stat()
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        rows = self._read()
        fresh, self.seen = rows[self.seen:], len(rows)
        return fresh


def follow_run(
    out: Path,
    client: ControlClient,
    run_id: int,
    *,
    rounds: int,
    sites: int,
    console: Console,
    timeout_s: float,
    on_round: Callable[[MetricsRow], None] | None = None,
    check_alive: Callable[[], str | None] | None = None,
    site_word: str = "sites",
    on_poll: Callable[[], None] | None = None,
    wake: threading.Event | None = None,
    outputs_done: Callable[[], bool] | None = None,
) -> RunStatus | None:
    """Poll the run status, print one progress line per round, return the final status.

    `check_alive` is called every poll; a non-None return (e.g. "the SuperLink exited") aborts
    with RunError. On timeout the run is stopped and RunError raised. `on_poll` runs after each
    poll's new rows; `wake`, once set, makes the polls short. `outputs_done` (optional): once it
    returns True the run's outputs are complete and None is returned without waiting for Flower
    to tear the run down (the caller owns the SuperLink and stops it).
    """
    deadline = time.monotonic() + timeout_s
    metrics = MetricsTail(out / "metrics.jsonl")
    status = poll_status(client, run_id, wake)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"starting {sites} {site_word}", total=rounds)
        while True:
            dead = check_alive() if check_alive is not None else None
            for row in metrics.new_rows():
                console.print(round_line(row, rounds))
                progress.update(task, completed=row.round, description=_short(row.central))
                if on_round:
                    on_round(row)
            if on_poll is not None:
                on_poll()
            if status.finished:
                return status
            if outputs_done is not None and outputs_done():
                return None
            if dead is not None:
                raise LostSuperLink(dead)
            if time.monotonic() > deadline:
                client.stop(run_id)
                raise RunError(f"run {run_id} did not finish within {timeout_s:.0f}s (stopped)")
            if status.status == "running" and metrics.seen == 0:
                progress.update(task, description=f"round 1 ({sites} sites)")
            _pause(wake)
            status = poll_status(client, run_id, wake)


def _pause(wake: threading.Event | None) -> None:
    if wake is None:
        time.sleep(POLL_S)
    elif wake.is_set():
        time.sleep(WOKEN_POLL_S)
    else:
        wake.wait(POLL_S)


def _fmt(x: float | None, spec: str) -> str:
    return format(_num(x), spec)


def _summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    """The run's outcome as (label, value) lines: accuracy, rounds, privacy, rejections, bytes, compression, watermark."""
    if "r2" in s.final:
        errors = f"{_fmt(s.final.get('rmse'), '.4g')} / {_fmt(s.final.get('mae'), '.4g')}"
        rows = [("final R²", _fmt(s.final.get("r2"), ".4f")), ("final RMSE / MAE", errors)]
    else:
        rows = [("final accuracy", _fmt(s.final.get("accuracy"), ".4f"))]
    if "auc" in s.final:
        rows.append(("final ROC AUC", _fmt(s.final["auc"], ".4f")))
    rows.append(("rounds", f"{s.rounds_completed}/{s.rounds}"))
    priv = s.privacy
    if priv.enabled:
        rows.append(("max epsilon (per site)",
                     f"{priv.max_epsilon or 0:.4f} of {priv.epsilon_budget} (delta {priv.delta}, {priv.accountant})"))
        if priv.mode == "distributed":
            trust = f"sums of >= {priv.min_sites} sites, <= {priv.colluders} colluding"
            rows.append(("distributed DP", f"{trust}; local floor max epsilon {_fmt(priv.max_local_epsilon, '.4g')}"))
    elif priv.max_epsilon is not None:
        rows.append(("max epsilon (per site)", f"{priv.max_epsilon:.4f} (as reported by the sites)"))
    rows += [("rejected updates", str(s.rejected_updates)), ("refused rounds", str(s.refused_rounds)),
             ("bytes up / down", f"{s.bytes_up:,} / {s.bytes_down:,}")]
    comp = s.compression
    if comp.codec not in (None, "none") and comp.ratio_up:
        rows.append(("uplink compression", f"{comp.codec}: {comp.ratio_up:.1f}x fewer bytes than dense fp32"))
    if s.sparsity:
        rows.append(("model sparsity", f"{s.sparsity:.1%}"))
    if s.watermark is not None:
        wm = s.watermark
        rows.append(("watermark", f"{wm.matches}/{wm.n} triggers, p = {wm.p_value:.3g}"))
    sel = s.selection
    if sel is not None and sel.metric != "last":
        rows.append(("model.pt", f"round {sel.round}: {sel.reason}"))
    rows += [("warning", w) for w in s.warnings]
    if s.status != "completed" or s.stop_reason:
        rows.append(("status", s.status + (f": {s.stop_reason}" if s.stop_reason else "")))
    return rows


def report_row(out: Path) -> str:
    """Write OUT/report.html; the table's "report" cell (the path, or why it was not written)."""
    try:
        from fedseek.outputs.report import write_report

        return str(write_report(out))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not fail a finished run
        return f"not written ({type(exc).__name__}: {exc})"


def print_summary(console: Console, s: RunSummary, out: Path, wall: float, report: str | None = None) -> None:
    """The end-of-run table (accuracy, rounds, epsilon, rejections, bytes, wall time, outputs) and report.html.

    `report` is the report cell when report.html was already written (see fedseek.ops.launcher.ReportAhead).
    """
    t = Table(title=f"fedseek run {s.name}", show_header=False)
    for label, value in _summary_rows(s):
        t.add_row(label, value)
    t.add_row("wall time", f"{wall:.1f}s")
    t.add_row("outputs", str(out))
    t.add_row("report", report if report is not None else report_row(out))
    console.print(t)
