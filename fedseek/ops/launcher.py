"""One launcher for `fedseek simulate` and `fedseek run`: submit the fedseek app to a SuperLink and follow it to its end.

Both commands hand a `RunRequest` (which SuperLink, which run config, what to expect) to a
`Launcher`: it stages the Flower App (fedseek.ops.app_stage), submits it through the Control
API, streams the ServerApp log to OUT/run.log, follows OUT/metrics.jsonl and the run status
(fedseek.ops.follow), and fails unless the run ends `finished:completed` with a summary
written. On Ctrl-C or SIGTERM it stops the run it submitted; the processes a command started
(the simulation's SuperLink) are stopped by that command, around the launcher.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console

from fedseek.config import ConfigError, MetricsSpec
from fedseek.ops import signals
from fedseek.ops.app_stage import staged_app_dir
from fedseek.ops.flower_control import ControlClient, RunConfigValue, RunLog, RunStatus
from fedseek.ops.follow import LostSuperLink, RunError, follow_run, print_summary, report_row, tail
from fedseek.outputs.schema import MetricsRow, RunSummary, SchemaError, read_summary

if TYPE_CHECKING:
    from fedseek.outputs.prometheus import PrometheusMetrics


@dataclass
class RunRequest:
    """What to run where: the SuperLink connection, the run config, and what the run should produce."""

    flwr_home: Path
    connection: str
    out: Path
    run_config: dict[str, RunConfigValue]
    rounds: int
    sites: int
    timeout_s: float
    federation_config: dict[str, int | float] | None = None
    site_word: str = "sites"
    quiet: bool = False  # hide Flower's "Using SuperLink: ..." line
    announce: bool = False  # print "run N submitted; ServerApp log: ..."
    check_alive: Callable[[], str | None] | None = None
    error: type[RunError] = RunError
    resume_hint: str = ""  # how to continue after a lost SuperLink (appended to that one-line error)
    # The command owns the SuperLink (simulation): end the follow as soon as the outputs are complete (summary.json
    # written, the ServerApp's last log line streamed) instead of waiting seconds for Flower to stop Ray.
    finish_on_outputs: bool = False
    metrics: MetricsSpec | None = None  # Prometheus: served by this command from launch to end when a port is set
    run_name: str = "fedseek"  # the `run` label of every Prometheus series
    watermark: bool = False  # the run embeds a watermark: export its p-value series


@dataclass
class Outcome:
    """A completed run: its summary (typed, and summary.json's content as written) and its report in the making."""

    summary: RunSummary
    data: dict[str, Any]
    ahead: ReportAhead | None = None
    error: type[RunError] = RunError  # raised by `report` when the run did not complete (summary status)


#: Bound on waiting for the ServerApp's last log line once summary.json exists (it uploads logs every 0.2 s).
LAST_LOG_WAIT_S = 3.0
#: The ServerApp's last log line (fedseek.runtime.coordinator: "[fedseek] done (...)").
LAST_LOG_MARK = b"[fedseek] done ("


class OutputsDone:
    """True once summary.json exists and run.log holds the ServerApp's last line (or LAST_LOG_WAIT_S later)."""

    def __init__(self, out: Path, run_log: Path, wake: threading.Event | None = None) -> None:
        """Watch OUT/summary.json and the streamed run.log; set `wake` (short polls) once summary.json exists."""
        self.summary, self.run_log, self.wake = out / "summary.json", run_log, wake
        self._since: float | None = None

    def __call__(self) -> bool:
        """Whether the run's outputs are complete."""
        if self._since is None:
            if not self.summary.exists():
                return False
            self._since = time.monotonic()
            if self.wake is not None:
                self.wake.set()
        if time.monotonic() - self._since >= LAST_LOG_WAIT_S:
            return True
        try:
            with open(self.run_log, "rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - 4096))
                return LAST_LOG_MARK in fh.read()
        except OSError:
            return False


class ReportAhead:
    """Writes report.html as soon as the ServerApp has written summary.json (its last output), in a thread.

    Flower then still tears the run down (the simulation engine stops Ray) for seconds; the report
    is drawn meanwhile instead of after, on cores that are idle by then.
    """

    def __init__(self, out: Path) -> None:
        """Watch OUT/summary.json (removed before the run was submitted)."""
        self.out = out
        self._thread: threading.Thread | None = None
        self._result: str | None = None

    def poll(self) -> None:
        """Start the report once summary.json exists (called on every follow poll)."""
        if self._thread is None and (self.out / "summary.json").exists():
            self._thread = threading.Thread(target=self._write, name="fedseek-report", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        self._result = report_row(self.out)

    def result(self, timeout_s: float = 600.0) -> str | None:
        """The report cell once written (None if it was never started)."""
        if self._thread is None:
            return None
        self._thread.join(timeout_s)
        return self._result


class OutInUse(ConfigError):
    """Another fedseek command is running into the same output directory (one line; exit 2)."""


class AlreadyFinished(Exception):  # noqa: N818 - not an error: `--resume` of a finished run has nothing to do
    """`--resume` on a run directory whose run completed: nothing to resume (the CLI says so and exits 0)."""


LOCK_FILE = ".fedseek.lock"
_HELD: dict[Path, IO[str]] = {}  # run directories this process holds (released when it exits)


def lock_out(out: Path) -> None:
    """Hold OUT for this process (an advisory lock): a second run into the same directory is refused while this one runs."""
    import fcntl
    import os

    out = out.resolve()
    if out in _HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise OutInUse(f"{out} is in use by another fedseek run (pid {holder}); wait for it to end or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD[out] = fh


def prepare_out(out: Path, *, resume: bool = False) -> Path:
    """Lock OUT and remove the previous run's end-of-run files (metrics and audit too, unless resuming).

    `resume` of a run that completed raises AlreadyFinished before anything is touched.
    """
    if resume and (out / "summary.json").exists():
        try:
            done = read_summary(out / "summary.json")
        except (SchemaError, ValueError):
            done = None
        if done is not None and done.status == "completed":
            raise AlreadyFinished(f"the run in {out} already completed ({done.rounds_completed}/{done.rounds} rounds, "
                                  f"final accuracy {done.final_accuracy}): nothing to resume")
    lock_out(out)
    (out / "summary.json").unlink(missing_ok=True)
    if not resume:
        for stale in ("metrics.jsonl", "audit.jsonl"):
            (out / stale).unlink(missing_ok=True)
    return out


class Launcher:
    """Submits one run and follows it; construct it early (it stages the app and imports Flower's client)."""

    def __init__(self, req: RunRequest, console: Console) -> None:
        """Stage the app and open the Control API client (no request is sent yet)."""
        self.req, self.console = req, console
        self.run_log = req.out / "run.log"
        self.run_id: int | None = None
        try:
            self.app_dir = staged_app_dir()
        except RuntimeError as exc:
            raise req.error(str(exc)) from None
        self.client = ControlClient(req.flwr_home, req.connection, quiet=req.quiet)
        self.prometheus = self._serve_metrics()

    def _serve_metrics(self) -> PrometheusMetrics | None:
        """The run's Prometheus endpoint, up from launch (its URL printed); None when the config sets no port."""
        m = self.req.metrics
        if m is None or m.prometheus_port is None:
            return None
        from fedseek.outputs.prometheus import PrometheusMetrics

        try:
            prom = PrometheusMetrics(m.prometheus_host, m.prometheus_port, run=self.req.run_name, watermark=self.req.watermark)
        except OSError as exc:
            raise self.req.error(f"cannot serve Prometheus metrics on {m.prometheus_host}:{m.prometheus_port} "
                                 f"({exc.strerror or exc}); set metrics.prometheus_port to a free port or 0") from None
        self.console.print(f"Prometheus metrics: {prom.url}", highlight=False)
        return prom

    def submit(self) -> int:
        """Start the run (signals held back meanwhile, so a started run always has a known id to stop)."""
        with signals.deferred():
            try:
                self.run_id = self.client.start_run(self.app_dir, self.req.run_config, self.req.federation_config)
            except RuntimeError as exc:
                raise self.req.error(str(exc)) from None
        return self.run_id

    def follow(self, on_round: Callable[[MetricsRow], None] | None = None) -> Outcome:
        """Submit, stream the log, follow the run to its end; the Outcome, or the request's error type."""
        req = self.req
        if self.prometheus is not None:
            prom, user = self.prometheus, on_round

            def on_round(row: MetricsRow) -> None:
                prom.observe_round(row)
                if user is not None:
                    user(row)

        run_id = self.submit()
        if req.announce:
            self.console.print(f"run {run_id} submitted; ServerApp log: {self.run_log}")
        log = RunLog(req.flwr_home, req.connection, run_id, self.run_log)
        ahead = ReportAhead(req.out)
        drain_s = 2.0  # the log stream ends with the run: let it drain
        try:
            done = OutputsDone(req.out, self.run_log, log.ended) if req.finish_on_outputs else None
            status = self._follow(run_id, on_round, ahead, log.ended, done)
            if status is None:  # outputs complete, Flower not done tearing the run down: end it (the SuperLink's
                self._stop_run()  # open log stream would otherwise hold its shutdown) and do not wait for the stream
                drain_s = 0.0
            outcome = self._outcome(run_id, status)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self._stop_run()
            ahead.result(timeout_s=30)  # never leave a report half-written behind an error
            raise
        finally:
            log.stop(wait_s=drain_s)
        outcome.ahead = ahead
        return outcome

    def _follow(self, run_id: int, on_round: Callable[[MetricsRow], None] | None, ahead: ReportAhead,
                wake: threading.Event, done: Callable[[], bool] | None) -> RunStatus | None:
        req = self.req
        try:
            return follow_run(req.out, self.client, run_id, rounds=req.rounds, sites=req.sites, console=self.console,
                              timeout_s=req.timeout_s, on_round=on_round, check_alive=req.check_alive, site_word=req.site_word,
                              on_poll=ahead.poll, wake=wake, outputs_done=done)
        except LostSuperLink as exc:
            raise req.error(f"{exc}; {req.resume_hint}" if req.resume_hint else str(exc)) from None
        except RunError as exc:
            if isinstance(exc, req.error):
                raise
            raise req.error(str(exc)) from None

    def _outcome(self, run_id: int, status: RunStatus | None) -> Outcome:
        """The run's Outcome; `status` None: the outputs were complete before Flower's teardown (summary.json decides)."""
        if status is not None and not status.ok:
            raise self.req.error(f"run {run_id} ended {status}" + (f": {status.details}" if status.details else "")
                                 + f"\n--- last lines of {self.run_log} ---\n{tail(self.run_log)}")
        path = self.req.out / "summary.json"
        if not path.exists():
            raise self.req.error(f"run {run_id} completed but wrote no summary.json; see {self.run_log}")
        try:
            return Outcome(read_summary(path), json.loads(path.read_text()), error=self.req.error)
        except (SchemaError, ValueError) as exc:
            raise self.req.error(f"run {run_id} completed but its summary is unreadable: {exc}") from None

    def _stop_run(self) -> None:
        if self.run_id is not None:
            try:
                self.client.stop(self.run_id)
            except Exception:  # noqa: BLE001 - the SuperLink may be gone already
                pass

    def close(self) -> None:
        """Close the Control API client and stop serving metrics."""
        self.client.close()
        if self.prometheus is not None:
            self.prometheus.close()


def report(console: Console, outcome: Outcome, out: Path, started_at: float) -> dict[str, Any]:
    """Print the end-of-run table (report.html: waited for if started ahead, else written now); returns summary.json's content.

    Raises the request's error (one line: the summary's status and stop_reason) when the run did not
    complete: every site refused, failed or timed out (no update accepted), or it stopped early.
    """
    wall = time.time() - started_at  # as before: the run's wall time, not counting the report
    cell = outcome.ahead.result() if outcome.ahead is not None else None
    s = outcome.summary
    print_summary(console, s, out, wall, cell)
    if s.status != "completed":
        raise outcome.error(f"run {s.run_id} {s.status}: {s.stop_reason or 'no reason recorded'} (outputs in {out})")
    return outcome.data
