"""The operator tooling without Flower processes: the typer CLI's exit codes, signals, process trees, pidfiles,
the staged Flower App, and following a run's metrics through the typed schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from fedseek.ops import app_stage, processes
from fedseek.ops.daemons import Pidfile, running_pidfile, stop_pidfile
from fedseek.ops.follow import MetricsTail, RunError, print_summary, round_line
from fedseek.outputs.schema import MetricsRow, RunSummary, SiteRoundView
from tests.conftest import ROOT


def fedseek(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------ exit codes


def test_version_prints_the_installed_version():
    res = fedseek("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"fedseek {version('fedseek')}"


USAGE_ERRORS = [["simulate", "--no-such-option"], ["no-such-command"], ["site", "start"], ["certs", "init", "--days", "x"], []]


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_usage_errors_exit_2(args):
    res = fedseek(*args)
    assert res.returncode == 2, (args, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr


def test_bad_coordinator_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "coordinator.yaml"
    bad.write_text("rounds: 0\nsuperlink: {port: 9092}\n")
    for cmd in (["coordinator", "status"], ["run"]):
        res = fedseek(*cmd, "--config", str(bad))
        assert res.returncode == 2, (cmd, res.stderr)
        assert len(lines(res.stderr)) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lines(res.stderr)[0].startswith("config error:") and "rounds" in res.stderr


def test_missing_run_dir_and_watermark_arguments_exit_2(tmp_path):
    res = fedseek("report", str(tmp_path / "nope"))
    assert res.returncode == 2 and "is not a run directory" in res.stderr
    res = fedseek("watermark", "keygen", "--out", str(tmp_path / "k"))
    assert res.returncode == 2 and "--input-shape and --num-classes" in res.stderr


def test_python_m_fedseek_ops_cli_still_works():
    res = subprocess.run([sys.executable, "-m", "fedseek.ops.cli", "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.startswith("fedseek ")


# ------------------------------------------------------------------ signals

_WAITER = textwrap.dedent("""
    import sys, time
    from fedseek.ops import signals
    with signals.handle_termination():
        try:
            with signals.deferred():
                print("holding", flush=True)
                time.sleep(float(sys.argv[1]))
                print("released", flush=True)
            time.sleep(30)
        except KeyboardInterrupt as exc:
            print("caught", type(exc).__name__, flush=True)
            sys.exit(signals.exit_code(exc))
""")


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "Terminated"), (signal.SIGINT, 130, "KeyboardInterrupt")])
def test_sigterm_and_sigint_unwind_with_their_exit_codes_after_a_deferred_block(sig, code, name):
    proc = subprocess.Popen([sys.executable, "-c", _WAITER, "1.0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    proc.send_signal(sig)  # held back until the deferred block ends
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert out.split() == ["released", "caught", name]


_NAPPING_COMMAND = textwrap.dedent("""
    import sys, time
    from fedseek.ops import cli

    def nap() -> int:
        print("napping", flush=True)
        time.sleep(30)
        return 0

    cli.app.command("nap")(nap)
    sys.exit(cli.main(["nap"]))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_cli_exit_code_names_the_signal(sig, code, word):
    proc = subprocess.Popen([sys.executable, "-c", _NAPPING_COMMAND], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "napping"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert f"{word}; stopped all processes" in err and "Traceback" not in err


# ------------------------------------------------------------------ processes


def _sleeper_tree() -> processes.ProcessTree:
    """A shell in its own session with two children, one of them orphaned (re-parented) when its parent exits."""
    script = "sleep 60 & (sleep 60 &) ; exec sleep 60"
    return processes.start_process(["/bin/sh", "-c", script], env=dict(os.environ), log=None, name="sleepers")


def test_process_tree_finds_descendants_and_orphans_and_stops_them_all():
    tree = _sleeper_tree()
    try:
        deadline = time.monotonic() + 10
        while len(tree.alive()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            tree.sample()
        seen = dict(tree.seen)
        assert len(tree.alive()) >= 3, seen  # the shell (exec'd into sleep) and both sleeps, the orphan via the session
    finally:
        tree.stop(timeout_s=5)
    assert tree.alive() == []
    assert not [p for p, s in seen.items() if processes.is_running(p, s)]


def test_is_running_checks_the_start_time_and_understands_old_tick_pidfiles():
    me = psutil.Process()
    assert processes.is_running(me.pid, me.create_time())
    assert not processes.is_running(me.pid, me.create_time() - 3600)  # a recycled pid: another process
    ticks = round((me.create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
    assert processes.is_running(me.pid, ticks)  # a pidfile written by fedseek 0.1 (/proc start time in ticks)
    assert not processes.is_running(2**22 + 12345, me.create_time())


def test_pidfile_is_written_atomically_and_stops_its_detached_daemon(tmp_path):
    tree = _sleeper_tree()
    path = tmp_path / "state" / "daemon.pid"
    pf = Pidfile(tree.pid, processes.start_time(tree.pid) or 0.0, ["sleep"], "here", "log")
    pf.write(path)
    assert (path.stat().st_mode & 0o777) == 0o644 and not list(path.parent.glob("*.tmp"))
    assert Pidfile.read(path) == pf and running_pidfile(path) == pf
    try:
        assert stop_pidfile(path, timeout_s=5) == pf
    finally:
        tree.stop(timeout_s=2)
    assert not path.exists() and stop_pidfile(path) is None
    tree.sample()
    assert tree.alive() == []


# ------------------------------------------------------------------ the staged Flower App


def _fab_names(fab: bytes) -> list[str]:
    import io
    import zipfile

    return sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist())


def test_staged_app_holds_exactly_the_fab_files_and_is_reused(tmp_path):
    from fedseek.ops.flower_control import build_fab

    staged = app_stage.staged_app_dir(tmp_path)
    assert staged.parent == tmp_path and staged.name.startswith(app_stage.STAGE_PREFIX)
    assert app_stage.staged_app_dir(tmp_path) == staged  # unchanged sources: the same directory
    assert (staged / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert not (staged / ".venv").exists() and not (staged / "tests").exists()
    expected = sorted({p.relative_to(ROOT).as_posix() for top in ("fedseek", "server", "clients") for p in (ROOT / top).rglob("*.py")
                       if "__pycache__" not in p.parts and not p.name.startswith("test_") and not p.name.endswith("_test.py")})
    fab, config = build_fab(staged)
    assert config["project"]["name"] == "fedseek"
    assert _fab_names(fab) == sorted([".info/CONTENT", "pyproject.toml", *expected])
    for rel in expected:
        assert (staged / rel).read_bytes() == (ROOT / rel).read_bytes(), rel


@pytest.mark.slow
def test_staged_fab_is_byte_identical_to_the_fab_of_the_repository_root(tmp_path):
    """What `flwr run .` would submit from the checkout (walking .venv and all: seconds) is what the staged app gives."""
    from fedseek.ops.flower_control import build_fab

    assert build_fab(app_stage.staged_app_dir(tmp_path))[0] == build_fab(ROOT)[0]


def test_staged_app_changes_with_the_sources(tmp_path, monkeypatch):
    first = app_stage.staged_app_dir(tmp_path)
    files = app_stage.app_files(ROOT)
    extra = tmp_path / "extra.py"
    extra.write_text("x = 1\n")
    monkeypatch.setattr(app_stage, "app_files", lambda root: {**files, "fedseek/extra.py": extra})
    second = app_stage.staged_app_dir(tmp_path)
    assert second != first and (second / "fedseek" / "extra.py").read_text() == "x = 1\n"


# ------------------------------------------------------------------ following a run


def _row(rnd: int, **kw) -> dict:
    return {"round": rnd, "time": 1.0 + rnd, "round_seconds": 0.5, "sampled": 3, "accepted": 2, "rejected": 1,
            "central": {"accuracy": 0.9, "loss": 0.25}, "sites": {"a": {"status": "trained", "epsilon": 0.5}}, **kw}


def test_metrics_tail_reads_new_typed_rows_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n")
    tail = MetricsTail(path)
    assert tail.seen == 1 and tail.new_rows() == []
    with open(path, "a") as fh:
        fh.write(json.dumps(_row(2)) + "\n" + '{"round": 3, "ti')  # a partial line (crash mid-write) is not a row yet
    rows = tail.new_rows()
    assert [r.round for r in rows] == [2] and isinstance(rows[0], MetricsRow)
    assert rows[0].sites["a"].epsilon == 0.5
    line = round_line(rows[0], 5)
    assert line.startswith("round   2/5  accuracy 0.9000  loss 0.2500  sites 2/3") and "excluded/failed 1" in line
    assert "max eps 0.500" in line
    path.write_text(json.dumps({**_row(4), "schema_version": 99}) + "\n")
    with pytest.raises(RunError, match="schema_version"):
        tail.new_rows()


def test_print_summary_from_the_typed_summary(tmp_path, monkeypatch):
    import fedseek.outputs.report as report

    monkeypatch.setattr(report, "write_report", lambda out: Path(out) / "report.html")
    summary = RunSummary(name="t", rounds=3, rounds_completed=3, num_sites=2, strategy="fedavg", seed=1,
                         final={"accuracy": 0.95, "auc": 0.99}, bytes_up=1234567, bytes_down=89)
    console = Console(record=True, width=200)
    print_summary(console, summary, tmp_path, 12.34)
    text = console.export_text()
    for expected in ("final accuracy", "0.9500", "final ROC AUC", "0.9900", "3/3", "1,234,567 / 89", "12.3s", "report.html"):
        assert expected in text, expected
    assert SiteRoundView(status="trained").epsilon is None


def test_certs_request_sign_renew_revoke_from_the_command_line(tmp_path):
    certs, site = tmp_path / "coord-certs", tmp_path / "site"
    assert fedseek("certs", "init", "--out", str(certs)).returncode == 0
    res = fedseek("certs", "request", "hospital-a", "--out", str(site))
    assert res.returncode == 0 and "send to the coordinator" in res.stdout and "SHA256:" in res.stdout, res.stderr
    res = fedseek("certs", "sign", str(site / "hospital-a.csr"), "--pub", str(site / "hospital-a.pub"), "--certs", str(certs),
                  "--days", "7")
    assert res.returncode == 0 and "certificate serial" in res.stdout and "send back to the site" in res.stdout, res.stderr
    res = fedseek("certs", "renew", "hospital-a", "--certs", str(certs))
    assert res.returncode == 0 and "new certificate serial" in res.stdout, res.stderr
    res = fedseek("certs", "revoke", "hospital-a", "--certs", str(certs))
    assert res.returncode == 0 and "revoked 2 certificate(s)" in res.stdout, res.stdout + res.stderr
    res = fedseek("certs", "sign", str(site / "hospital-a.pub"), "--pub", str(site / "hospital-a.pub"), "--certs", str(certs))
    assert res.returncode == 2 and len(lines(res.stderr)) == 1 and "not a PEM certificate request" in res.stderr, res.stderr


def test_run_with_a_bad_coordinator_test_table_exits_2_before_anything_starts(tmp_path):
    """The coordinator's test table is read before submission: a missing value is one line and exit 2, no output written."""
    table = tmp_path / "test.csv"
    table.write_text("a,b,y\n1.0,,0\n2.0,3.0,1\n")
    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text(f"name: t\ntransport: https\nout_dir: {tmp_path / 'out'}\n"
                   f"task: {{test_file: {table}, label_column: y}}\n")
    res = fedseek("run", "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert len(lines(res.stderr)) == 1 and "missing values in columns: b (1)" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
