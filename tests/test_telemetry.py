"""Telemetry: Prometheus endpoint values, atomic outputs, audit log."""

from __future__ import annotations

import json
import urllib.request

from fedseek.outputs.store import PrometheusMetrics, RunOutputs, read_metrics


def test_prometheus_endpoint_serves_round_metrics():
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        prom.observe_round({
            "round": 3, "accepted": 7, "sampled": 8, "round_seconds": 1.5, "central": {"accuracy": 0.91, "loss": 0.3},
            "rejections": [{"site": "s1", "reason": "non-finite values"}], "refused": 1, "failed": 0, "timed_out": 1,
            "bytes_up": 1000, "bytes_down": 4000, "sites": {"site-001": {"epsilon": 1.25}}, "watermark": {"p_value": 1e-30},
        })
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
        out.append_metrics({"round": r, "x": float("nan")})
    with open(out.metrics_path, "a") as fh:
        fh.write('{"round": 5, "trunc')  # a crash mid-line
    assert [r["round"] for r in read_metrics(out.metrics_path)] == [1, 2, 3, 4]
    out.truncate_metrics(2)
    rows = read_metrics(out.metrics_path)
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["x"] is None
    out.audit("checkpoint", round=2)
    ev = json.loads((tmp_path / "audit.jsonl").read_text())
    assert ev["event"] == "checkpoint" and ev["round"] == 2
