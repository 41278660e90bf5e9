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


def test_prometheus_endpoint_serves_round_metrics():
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        prom.observe_round(_row(
            3, accepted=7, sampled=8, round_seconds=1.5, central={"accuracy": 0.91, "loss": 0.3},
            rejections=[{"site": "s1", "reason": "non-finite values"}], refused=1, failed=0, timed_out=1,
            bytes_up=1000, bytes_down=4000, sites={"site-001": {"status": "trained", "epsilon": 1.25}},
            watermark={"steps": 1, "trigger_accuracy_before": 0.1, "trigger_accuracy": 1.0, "matches": 9, "n": 9, "p_value": 1e-30,
                       "detected": True, "seconds": 0.1},
        ))
        body = urllib.request.urlopen(f"http://127.0.0.1:{prom.port}/metrics", timeout=5).read().decode()
    finally:
        prom.close()
    assert "fedseek_round 3.0" in body
    assert "fedseek_round_participants 7.0" in body
    assert "fedseek_accuracy 0.91" in body
    assert 'fedseek_site_epsilon{site="site-001"} 1.25' in body
    assert 'fedseek_rejected_updates_total{reason="non-finite"} 1.0' in body
    assert 'fedseek_bytes_total{direction="up"} 1000.0' in body
    assert "fedseek_failed_replies_total 1.0" in body
    assert "fedseek_watermark_p_value 1e-30" in body


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
