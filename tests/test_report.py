"""report.html from synthetic run outputs (no simulation): content, self-containment, escaping, edge cases.

The fake run directories hold what the coordinator writes: every row and summary is checked
against the typed schema before the report reads it (except where a case is about bad files).
The full run is rendered once per module and shared by the tests that only read its page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape

from fedseek.outputs import report_plots
from fedseek.outputs.report import build_report, main, write_report
from fedseek.outputs.schema import RunSummary, parse_row

EVIL = '<script>alert("x")</script>&'
FAILURE = "error reply (code 2): \x1b[36mray::ClientAppActor.run()\x1b[39m boom"


def _row(rnd: int, *, dp: bool = True, watermark: bool = False, sparsity: float = 0.0, sites: int = 3, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "schema_version": 1,
        "round": rnd,
        "time": 1.7e9 + rnd,
        "round_seconds": 5.0 if rnd == 1 else 0.5,
        "sampled": sites,
        "accepted": sites,
        "rejected": 0,
        "refused": 0,
        "failed": 0,
        "timed_out": 0,
        "timed_out_sites": [],
        "failures": [],
        "rejections": [],
        "refusals": [],
        "train_loss": 0.6 / rnd,
        "central": {"loss": 0.5 / rnd, "accuracy": 0.8 + 0.01 * rnd, "balanced_accuracy": 0.78 + 0.01 * rnd, "auc": 0.9 + 0.005 * rnd},
        "bytes_up": 8456 * sites,
        "wire_bytes_up": 9028 * sites,
        "bytes_down": 8456 * sites,
        "codec": "none",
        "sparsity": sparsity,
        "watermark": None,
        "sites": {},
    }
    for i in range(sites):
        view: dict[str, Any] = {"train-loss": 0.5, "num-examples": 40, "status": "trained"}
        if dp:
            view.update({"epsilon": 0.9 * rnd + 0.01 * i, "delta": 1e-5, "noise-multiplier": 1.5, "sample-rate": 0.25, "dp-steps": 8,
                         "dp-steps-total": 8 * rnd})
        row["sites"][f"site-{i:03d}"] = view
    if watermark:
        row["watermark"] = {"steps": 10, "trigger_accuracy_before": 0.5, "trigger_accuracy": 0.99, "matches": 198, "n": 200,
                            "p_value": 10.0 ** (-50 - rnd), "detected": True, "seconds": 0.1}
    row.update(extra)
    return row


def _summary(rounds: int, *, dp: bool = True, watermark: bool = False, sites: int = 3, **extra: Any) -> dict[str, Any]:
    site_privacy = {f"site-{i:03d}": {"epsilon": 2.7 + 0.01 * i, "delta": 1e-5, "steps": None, "noise_multiplier": 1.5, "sample_rate": 0.25,
                                      "rounds_trained": rounds, "refusals": 0} for i in range(sites)}
    s: dict[str, Any] = {
        "schema_version": 1,
        "name": "synthetic-run",
        "run_id": "123",
        "rounds": rounds,
        "rounds_completed": rounds,
        "num_sites": sites,
        "strategy": "fedavg",
        "dataset": "breast_cancer",
        "seed": 1,
        "initial": {"loss": 0.69, "accuracy": 0.61, "auc": 0.7},
        "final": {"loss": 0.1, "accuracy": 0.9321, "balanced_accuracy": 0.92, "auc": 0.9876},
        "final_accuracy": 0.9321,
        "privacy": {"enabled": dp, "accountant": "rdp" if dp else None, "delta": 1e-5 if dp else None,
                    "epsilon_budget": 3.0 if dp else None, "max_epsilon": 2.71 if dp else None, "sites": site_privacy if dp else {}},
        "bytes_up": 25368 * rounds,
        "wire_bytes_up": 27084 * rounds,
        "dense_bytes_up": 25368 * rounds,
        "bytes_down": 25368 * rounds,
        "compression": {"codec": "none", "ratio_up": 1.0},
        "sparsity": 0.0,
        "rejected_updates": 0,
        "rejections": [],
        "refused_rounds": 0,
        "failed_replies": 0,
        "excluded_sites": {},
        "watermark": {"p_value": 1e-55, "matches": 198, "n": 200, "num_classes": 2, "detected": True, "alpha": 1e-6, "commitment": "ab",
                      "embed_seconds": 0.4} if watermark else None,
        "stop_reason": None,
        "wall_seconds": 42.5,
    }
    s.update(extra)
    return s


def _write(run: Path, rows: list[dict[str, Any]] | None, summary: dict[str, Any] | None, *, valid: bool = True) -> Path:
    """A run directory; `valid` checks first that the files are what the schema reads."""
    if valid:
        for row in rows or []:
            parse_row(row)
        if summary is not None:
            RunSummary.model_validate(summary)
    run.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "external asset reference"
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-round DP run with watermark, pruning, a rejection, a refusal and a failure; its report written once."""
    rows = [_row(r, watermark=True, sparsity=0.2 * r) for r in range(1, 5)]
    rows[1]["failed"] = 1
    rows[1]["accepted"] = 2
    rows[2]["rejected"] = 1
    rows[2]["accepted"] = 2
    rows[2]["rejections"] = [{"node_id": 7, "site": "site-002", "reason": "update norm 72.1 above bound 5"}]
    rows[3]["refused"] = 1
    rows[3]["refusals"] = [{"site": "site-001", "reason": "site site-001 refuses round 4: epsilon would reach 3.2 > budget 3"}]
    rows[3]["sites"]["site-001"] = {"status": "refused", "epsilon": 2.7, "epsilon-budget": 3.0, "projected-epsilon": 3.2}
    summary = _summary(4, watermark=True, rejected_updates=1, refused_rounds=1, failed_replies=1, bytes_down=200_000,
                       rejections=[{"round": 3, "node_id": 7, "site": "site-002", "reason": "update norm 72.1 above bound 5"}],
                       excluded_sites={"site-001": "site site-001 refuses round 4: epsilon would reach 3.2 > budget 3"})
    run = _write(tmp_path_factory.mktemp("full") / "run", rows, summary)
    (run / "audit.jsonl").write_text(json.dumps({"event": "site_failed", "round": 2, "site": "site-000", "reason": FAILURE}) + "\n")
    return run, write_report(run)  # what `fedseek report RUN_DIR` and the end of `fedseek simulate` call


def test_report_html_is_written(full_run: tuple[Path, Path]) -> None:
    run, path = full_run
    assert path == run / "report.html"
    assert path.is_file() and path.stat().st_size > 0
    page = path.read_text(encoding="utf-8")
    assert "synthetic-run" in page and "0.9321" in page  # run name, final accuracy
    assert not list(run.glob(".report.html.*"))  # no temp file left behind


def test_full_dp_run(full_run: tuple[Path, Path]) -> None:
    _, path = full_run
    page = path.read_text()
    _assert_self_contained(page)
    # one PNG per figure: accuracy, epsilon, bytes, participation, watermark, sparsity
    assert page.count("data:image/png;base64,") == 6
    for anchor in ("accuracy", "privacy", "bytes", "participation", "watermark", "sparsity", "sites", "events", "rounds", "summary"):
        assert f'id="{anchor}"' in page, anchor
    assert "synthetic-run" in page and "breast_cancer" in page and "fedavg" in page
    assert "0.9321" in page and "0.9876" in page  # final accuracy and AUC
    assert "42.5 s" in page  # wall time
    assert "Per-site privacy" in page and "2.7000" in page and "update norm 72.1 above bound 5" in page
    assert "epsilon would reach 3.2" in page
    assert "ray::ClientAppActor.run() boom" in page and "\x1b" not in page  # audit failure reason, ANSI stripped
    assert "detected" in page
    # headline totals are summary.json's, not sums of the rounds
    assert '<div class="v">1 / 1 / 1</div>' in page  # rejected / refused / failed
    assert '<div class="v">2.7100 / 3</div>' in page  # max epsilon / budget
    assert '<div class="v">101.47 kB / 200.00 kB</div>' in page  # bytes up / down (the rounds sum to 101.47 kB down)
    assert "<summary>4 round(s)</summary>" in page and "<details open>" in page
    assert "schema_version" in page  # the summary table lists the file as the schema reads it


def test_escapes_malicious_names_and_reasons(tmp_path: Path) -> None:
    rows = [_row(1, sites=0)]
    rows[0]["sites"] = {EVIL: {"epsilon": 1.0, "status": "trained"}, "$x^2$ site": {"epsilon": 1.2, "status": "trained"}}
    rows[0]["rejections"] = [{"node_id": 1, "site": EVIL, "reason": f"bad {EVIL}"}]
    rows[0]["rejected"] = 1
    summary = _summary(1, sites=0, name=EVIL, dataset=EVIL, rejections=[{"round": 1, "site": EVIL, "reason": f"bad {EVIL}"}],
                       stop_reason=EVIL, compression={"codec": EVIL, "ratio_up": 2.0})
    summary["privacy"]["sites"] = {EVIL: {"epsilon": 1.0, "delta": 1e-5, "rounds_trained": 1, "refusals": 0}}
    page = write_report(_write(tmp_path / "run", rows, summary)).read_text()
    assert "<script" not in page.lower()
    assert EVIL not in page
    esc = str(escape(EVIL))  # autoescape: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;
    assert f"<title>fedseek report: {esc}</title>" in page and f"<h1>fedseek run report: {esc}</h1>" in page
    assert f"<b>dataset</b> {esc}" in page and f"Stopped early: {esc}" in page  # facts, banner
    assert f"({escape(EVIL[:19])}…)</div>" in page  # codec card (shortened)
    assert f"<td>{esc}</td>" in page and f"<td>bad {esc}</td>" in page  # site table, rejection reason
    assert page.count(esc) >= 8
    assert "plot unavailable" not in page  # a '$' in a site name does not start mathtext in the legend
    _assert_self_contained(page)


CASES = ["no_dp_one_round", "no_summary", "empty_metrics", "no_files", "garbage", "sparse_fields", "schema_errors", "many_sites"]


def _make_case(run: Path, case: str) -> None:
    if case == "no_dp_one_round":
        _write(run, [_row(1, dp=False)], _summary(1, dp=False))
    elif case == "no_summary":  # a crashed run: no summary.json, a partial last line
        _write(run, [_row(1), _row(2)], None)
        with (run / "metrics.jsonl").open("a") as fh:
            fh.write('{"round": 3, "ti')
    elif case == "empty_metrics":
        _write(run, [], _summary(3, rounds_completed=0))
    elif case == "no_files":
        run.mkdir()
    elif case == "garbage":
        run.mkdir()
        (run / "metrics.jsonl").write_text('[1, 2]\n{"round": "x", "central": 5, "sites": [1], "rejections": {"a": 1}}\nnot json\n'
                                           '{"round": 2, "central": {"accuracy": NaN}}\n{"trunc')
        (run / "summary.json").write_text('{"name": 3, "privacy": "yes", "final": [], "watermark": 7, "wall_seconds": "long"')
        (run / "audit.jsonl").write_text("[]\n{}\n")
    elif case == "sparse_fields":  # only the fields the schema requires
        wm = {"steps": 1, "trigger_accuracy_before": 0.5, "trigger_accuracy": 0.5, "matches": 1, "n": 2, "p_value": 0.0, "detected": False,
              "seconds": 0.0}
        _write(run, [{"round": 1, "time": 1.0, "round_seconds": 1.0, "central": {"accuracy": 0.5}},
                     {"round": 2, "time": 2.0, "round_seconds": 1.0, "central": {"accuracy": 0.6}, "watermark": wm}],
               {"name": "old", "rounds": 2, "rounds_completed": 2, "num_sites": 2, "strategy": "fedavg", "seed": 0})
    elif case == "schema_errors":  # rows and a summary that are not what the schema reads
        rows = [_row(1, dp=False), {k: v for k, v in _row(2, dp=False).items() if k != "time"}, _row(3, dp=False),
                _row(4, dp=False, schema_version=99)]
        summary = _summary(4, dp=False)
        summary["rounds"] = "many"
        _write(run, rows, summary, valid=False)
    elif case == "many_sites":  # epsilon plot switches to a min/median/max band
        _write(run, [_row(r, sites=60) for r in (1, 2, 3)], _summary(3, sites=60))


@pytest.mark.parametrize("case", CASES)
def test_degrades_gracefully(tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    _make_case(run, case)
    page = build_report(run)
    assert not (run / "report.html").exists()  # build_report writes nothing
    _assert_self_contained(page)
    assert "</html>" in page
    if case == "no_dp_one_round":
        assert "Differential privacy was off" in page and "Per-site participation" in page
        assert 'id="privacy"' in page and "epsilon spent" not in page
        assert "No watermark in this run" in page
        assert 'id="sparsity"' not in page
        assert page.count("data:image/png;base64,") == 3  # accuracy, bytes, participation
    if case == "no_summary":
        assert "No usable summary.json" in page and 'id="accuracy"' in page
        assert "metrics.jsonl: 1 line(s) skipped" in page  # the partial last line
    if case in ("empty_metrics", "no_files"):
        assert "No rounds recorded" in page and "data:image/png" not in page
    if case == "no_files":
        assert "metrics.jsonl is missing" in page
    if case == "garbage":
        assert "line(s) skipped" in page and "No rounds recorded" in page
        assert "summary.json: unreadable" in page and "audit.jsonl: 1 line(s) skipped" in page
    if case == "sparse_fields":
        assert 'id="accuracy"' in page and 'id="watermark"' in page and "plot unavailable" not in page
    if case == "schema_errors":
        assert "metrics.jsonl: 2 line(s) skipped (first: metrics.jsonl:2: field time: Field required" in page
        assert "summary.json: field rounds" in page and "No usable summary.json" in page
        assert 'id="accuracy"' in page and "<summary>2 round(s)</summary>" in page  # rounds 1 and 3 kept
    if case == "many_sites":
        assert 'id="privacy"' in page and "site-059" in page


def test_failing_plot_becomes_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError(f"no canvas {EVIL}")

    for name in ("plot_accuracy", "plot_bytes", "plot_participation"):
        monkeypatch.setattr(report_plots, name, broken)
    page = build_report(_write(tmp_path / "run", [_row(1, dp=False)], _summary(1, dp=False)))
    assert page.count(f"plot unavailable (RuntimeError: no canvas {escape(EVIL)})") == 3
    for anchor in ("accuracy", "bytes", "participation"):
        assert f'<a href="#{anchor}">' in page and f'<section id="{anchor}">' in page
    assert "data:image/png" not in page and "<script" not in page.lower()


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write(tmp_path / "run", [], _summary(2))
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").stat().st_mode & 0o044  # readable by others (umask permitting), unlike the temp file
    assert "synthetic-run" in (run / "report.html").read_text()
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- federated evaluation (additions)
def _federated(rnd: int, *, std: float) -> dict[str, Any]:
    site = {"status": "evaluated", "accuracy": 0.8, "accuracy_std": 0.05 if std else 0.0, "count": 40.0, "num_examples": 40,
            "noise_std": std, "epsilon": 0.3 * rnd if std else None, "delta": 1e-5 if std else None, "epsilon_budget": 3.0 if std else None}
    return {"round": rnd, "sampled": 3, "evaluated": 2, "refused": 1, "accuracy": 0.81, "accuracy_std": 0.03 if std else 0.0,
            "balanced_accuracy": 0.79, "balanced_accuracy_std": 0.04 if std else 0.0, "loss": 0.4, "loss_std": 0.1 if std else 0.0,
            "count": 80.0, "num_examples": 80, "noisy": std > 0,
            "sites": {"site-000": site, "site-001": site, "site-002": {"status": "refused", "reason": f"evaluation budget spent {EVIL}"}}}


@pytest.mark.parametrize("std", [1.7, 0.0])
def test_federated_evaluation_section(tmp_path: Path, std: float) -> None:
    rows = [_row(r, dp=std > 0) for r in (1, 2, 3)]
    rows[1]["federated"], rows[2]["federated"] = _federated(2, std=std), _federated(3, std=std)
    fed_sites = {"site-000": {"evaluations": 2, "epsilon": 0.9 if std else None, "epsilon_budget": 3.0 if std else None},
                 "site-002": {"refusals": 1, "excluded": "evaluation budget spent"}}
    summary = _summary(3, dp=std > 0, federated_evaluation={"every": 2, "rounds": [2, 3], "last": _federated(3, std=std),
                                                            "max_epsilon": 0.9 if std else None, "sites": fed_sites})
    page = write_report(_write(tmp_path / "run", rows, summary)).read_text()
    _assert_self_contained(page)
    assert '<section id="federated">' in page and '<a href="#federated">' in page
    if std:  # pooled accuracy ± its noise std per evaluation round, the DP warning, the card, summary.json's evaluation epsilon
        assert "<td>0.8100 ± 0.0300</td>" in page and "DP-noised estimates" in page and "Exact counts" not in page
        assert "federated accuracy (DP-noised)" in page and "<td>0.9000</td>" in page
    else:
        assert "<td>0.8100 ± 0.0000</td>" in page and "Exact counts" in page and "DP-noised" not in page
        assert "federated accuracy</div>" in page
    assert f"evaluation budget spent {escape(EVIL)}" in page and EVIL not in page
    assert "federated_evaluation.sites" in page and "3 site(s): see the table above" in page


def test_thousands_of_sites_are_aggregated_and_the_sites_to_look_at_listed(tmp_path: Path) -> None:
    """Beyond MAX_SITE_ROWS sites: min / median / max over all of them, then the refusing site and the highest epsilons first."""
    from fedseek.outputs.report_sites import MAX_SITE_ROWS

    n = MAX_SITE_ROWS + 300
    summary = _summary(3, sites=n)
    summary["privacy"]["sites"]["site-007"]["refusals"] = 2
    run = _write(tmp_path / "run", [_row(r, sites=5) for r in (1, 2, 3)], summary)
    page = build_report(run)
    _assert_self_contained(page)
    assert f"{n:,} sites: above, min / median / max over all of them" in page
    sites = page[page.index('id="sites"'):page.index("</section>", page.index('id="sites"'))]
    assert sites.count("<tr>") <= MAX_SITE_ROWS + 1 + 12  # the shown rows + headers + the aggregate's rows
    first = sites.index("site-007")
    assert first < sites.index(f"site-{n - 1:03d}") < sites.index(f"site-{n - 2:03d}")  # refusing first, then highest epsilon
    assert "site-010<" not in sites  # a low-epsilon site beyond the first MAX_SITE_ROWS is left to summary.json
    assert f"{2.7 + 0.01 * (n - 1):.4f}" in sites and "2.7000" in sites  # the aggregate's max and min cover every site
