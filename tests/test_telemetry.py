"""Run outputs: Prometheus endpoint values from a typed row, atomic metrics with crash-safe reading, audit log, schema."""

from __future__ import annotations

import json
import urllib.request

import pytest

from fedseek.outputs.prometheus import PrometheusMetrics
from fedseek.outputs.schema import MetricsRow, SchemaError, read_rows, read_summary
from fedseek.outputs.store import RunOutputs, read_metrics


def _row(r: int, **over) -> MetricsRow:
    return MetricsRow.model_validate({"round": r, "time": 1.0, "round_seconds": 0.5, **over})


def _scrape(prom: PrometheusMetrics) -> str:
    return urllib.request.urlopen(prom.url, timeout=5).read().decode()


def test_prometheus_endpoint_serves_round_metrics():
    prom = PrometheusMetrics("127.0.0.1", 0, run="wards", watermark=True)
    try:
        before = _scrape(prom)
        prom.observe_round(_row(
            3, accepted=7, sampled=8, round_seconds=1.5, central={"accuracy": 0.91, "loss": 0.3},
            rejections=[{"site": "s1", "reason": "non-finite values"}], refused=1, failed=0, timed_out=1,
            bytes_up=1000, bytes_down=4000, sites={"site-001": {"status": "trained", "epsilon": 1.25}},
            watermark={"steps": 1, "trigger_accuracy_before": 0.1, "trigger_accuracy": 1.0, "matches": 9, "n": 9, "p_value": 1e-30,
                       "detected": True, "seconds": 0.1},
        ))
        body = _scrape(prom)
    finally:
        prom.close()
    assert 'fedseek_run_up{run="wards"} 1.0' in before and 'fedseek_round{run="wards"} 0.0' in before  # up before round 1
    assert 'fedseek_round{run="wards"} 3.0' in body
    assert 'fedseek_round_participants{run="wards"} 7.0' in body
    assert 'fedseek_accuracy{run="wards"} 0.91' in body
    assert 'fedseek_site_epsilon{run="wards",site="site-001"} 1.25' in body
    assert 'fedseek_rejected_updates_total{reason="non-finite",run="wards"} 1.0' in body
    assert 'fedseek_bytes_total{direction="up",run="wards"} 1000.0' in body
    assert 'fedseek_failed_replies_total{run="wards"} 1.0' in body
    assert 'fedseek_watermark_p_value{run="wards"} 1e-30' in body
    assert prom.up.labels(run="wards")._value.get() == 0.0  # close() marks the run ended


def test_no_watermark_series_without_a_watermark():
    prom = PrometheusMetrics("127.0.0.1", 0, run="plain")
    try:
        body = _scrape(prom)
    finally:
        prom.close()
    assert "watermark" not in body and 'fedseek_run_up{run="plain"} 1.0' in body


def test_grafana_dashboard_queries_only_exported_series():
    """docs/grafana-dashboard.json: valid JSON, and every fedseek_* name in a query is a series the endpoint exports."""
    import re

    from tests.conftest import ROOT

    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    prom = PrometheusMetrics("127.0.0.1", 0, run="r", watermark=True)
    try:
        prom.observe_round(_row(1, rejections=[{"site": "s", "reason": "x"}], sites={"a": {"status": "trained", "epsilon": 1.0}},
                                central={"accuracy": 0.9, "loss": 0.2},
                                watermark={"steps": 1, "trigger_accuracy_before": 0.1, "trigger_accuracy": 1.0, "matches": 9, "n": 9,
                                           "p_value": 1e-9, "detected": True, "seconds": 0.1},
                                federated={"round": 1, "accuracy": 0.5, "sites": {"a": {"status": "evaluated", "epsilon": 0.1}}}))
        body = _scrape(prom)
    finally:
        prom.close()
    exported = {ln.split("{")[0].split(" ")[0] for ln in body.splitlines() if ln and not ln.startswith("#")}
    used = {name for e in exprs for name in re.findall(r"fedseek_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert all('run=~"$run"' in e for e in exprs)  # every panel follows the dashboard's run selector


def test_metrics_truncate_and_audit(tmp_path):
    out = RunOutputs(tmp_path)
    for r in range(1, 5):
        out.append_metrics(_row(r, train_loss=float("nan"), sites={"s": {"status": "trained", "noise_multiplier": 1.1}}))
    with open(out.metrics_path, "a") as fh:
        fh.write('{"round": 5, "trunc')  # a crash mid-line
    assert [r.round for r in read_rows(out.metrics_path)] == [1, 2, 3, 4]
    out.truncate_metrics(2)
    rows = read_metrics(out.metrics_path)
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["train_loss"] is None
    assert rows[0]["sites"]["s"] == {"status": "trained", "noise-multiplier": 1.1}  # the file keeps hyphenated per-site keys
    assert rows[0]["schema_version"] == 1
    out.audit("checkpoint", round=2)
    ev = json.loads((tmp_path / "audit.jsonl").read_text())
    assert ev["event"] == "checkpoint" and ev["round"] == 2


def test_schema_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"round": "x", "time": 1, "round_seconds": 1}\n{"round": 2, "time": 1, "round_seconds": 1}\n')
    with pytest.raises(SchemaError, match=r"metrics.jsonl:1: field round"):
        read_rows(bad)
    newer = tmp_path / "summary.json"
    newer.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(SchemaError, match="newer than this fedseek reads"):
        read_summary(newer)
    (tmp_path / "s2.json").write_text("{not json")
    with pytest.raises(SchemaError, match="unreadable"):
        read_summary(tmp_path / "s2.json")
