"""A run's Prometheus metrics: one registry per run, every series labelled with the run's name, updated from typed rows.

`fedseek simulate` and `fedseek run` serve it from launch to the end of the command (the
launcher reads each metrics.jsonl row as the coordinator appends it), so a scrape sees the run
while it waits for its sites too (`fedseek_run_up` 1, round 0). The watermark series exists only
when the run embeds a watermark. docs/grafana-dashboard.json charts these series.
"""

from __future__ import annotations

from typing import Any

from fedseek.outputs.schema import FederatedEvalRow, MetricsRow

#: Every series name this module exports, as Prometheus exposes it (counters with their _total suffix).
GAUGES = ("fedseek_run_up", "fedseek_round", "fedseek_round_participants", "fedseek_round_sampled", "fedseek_round_seconds",
          "fedseek_accuracy", "fedseek_loss", "fedseek_site_epsilon", "fedseek_federated_accuracy", "fedseek_federated_accuracy_std",
          "fedseek_site_evaluation_epsilon")
COUNTERS = ("fedseek_rejected_updates", "fedseek_refused_rounds", "fedseek_failed_replies", "fedseek_bytes")
WATERMARK = "fedseek_watermark_p_value"


class PrometheusMetrics:
    """The run's Prometheus metrics (own registry), served on host:port until close()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, run: str = "fedseek", watermark: bool = False) -> None:
        """Start serving at once (port 0: a free port, see `.port`); `watermark` adds the watermark p-value series."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry, self.run = CollectorRegistry(), run
        reg = self.registry

        def gauge(name: str, doc: str, *labels: str) -> Any:
            return Gauge(name, doc, ["run", *labels], registry=reg)

        def counter(name: str, doc: str, *labels: str) -> Any:
            return Counter(name, doc, ["run", *labels], registry=reg)

        self.up = gauge("fedseek_run_up", "1 while the run's command is running, 0 once it ended")
        self.round = gauge("fedseek_round", "last completed round")
        self.participants = gauge("fedseek_round_participants", "sites whose update was aggregated this round")
        self.sampled = gauge("fedseek_round_sampled", "sites asked to train this round")
        self.round_seconds = gauge("fedseek_round_seconds", "wall time of the last round")
        self.accuracy = gauge("fedseek_accuracy", "central test accuracy of the global model")
        self.loss = gauge("fedseek_loss", "central test loss of the global model")
        self.rejected = counter("fedseek_rejected_updates", "updates rejected by validation", "reason")
        self.refused = counter("fedseek_refused_rounds", "rounds refused by sites (privacy budget)")
        self.failed = counter("fedseek_failed_replies", "error replies and time-outs")
        self.bytes = counter("fedseek_bytes", "payload bytes on the wire", "direction")
        self.epsilon = gauge("fedseek_site_epsilon", "privacy spent per site (its ledger, as reported)", "site")
        self.fed_accuracy = gauge("fedseek_federated_accuracy", "pooled accuracy on the sites' held-out splits (noisy under DP)")
        self.fed_accuracy_std = gauge("fedseek_federated_accuracy_std", "noise std of the pooled federated accuracy")
        self.eval_epsilon = gauge("fedseek_site_evaluation_epsilon", "evaluation privacy spent per site (its evaluation ledger)", "site")
        self.wm_p = gauge(WATERMARK, "watermark p-value after embedding") if watermark else None
        self.up.labels(run=run).set(1)
        self.round.labels(run=run).set(0)
        self.server, self.thread = start_http_server(port, addr=host, registry=reg)
        self.host, self.port = host, int(self.server.server_port)

    @property
    def url(self) -> str:
        """Where Prometheus scrapes."""
        return f"http://{self.host}:{self.port}/metrics"

    def observe_round(self, row: MetricsRow) -> None:
        """Update every metric from one metrics.jsonl row."""
        run = self.run
        self.round.labels(run=run).set(row.round)
        self.participants.labels(run=run).set(row.accepted)
        self.sampled.labels(run=run).set(row.sampled)
        self.round_seconds.labels(run=run).set(row.round_seconds)
        if row.central.get("accuracy") is not None:
            self.accuracy.labels(run=run).set(float(row.central["accuracy"] or 0.0))
            self.loss.labels(run=run).set(float(row.central.get("loss") or 0.0))
        for r in row.rejections:
            self.rejected.labels(run=run, reason=r.reason.split(" ")[0][:40]).inc()
        self.refused.labels(run=run).inc(row.refused)
        self.failed.labels(run=run).inc(row.failed + row.timed_out)
        self.bytes.labels(run=run, direction="up").inc(row.bytes_up)
        self.bytes.labels(run=run, direction="down").inc(row.bytes_down)
        for site, view in row.sites.items():
            if view.epsilon is not None:
                self.epsilon.labels(run=run, site=site).set(view.epsilon)
        if row.watermark is not None and self.wm_p is not None:
            self.wm_p.labels(run=run).set(row.watermark.p_value)
        if row.federated is not None:
            self.observe_federated(row.federated)

    def observe_federated(self, fed: FederatedEvalRow) -> None:
        """Pooled federated accuracy (with its noise std) and each site's evaluation epsilon."""
        if fed.accuracy is not None:
            self.fed_accuracy.labels(run=self.run).set(fed.accuracy)
            self.fed_accuracy_std.labels(run=self.run).set(fed.accuracy_std or 0.0)
        for site, view in fed.sites.items():
            if view.epsilon is not None:
                self.eval_epsilon.labels(run=self.run, site=site).set(view.epsilon)

    def close(self) -> None:
        """Mark the run ended and stop serving."""
        self.up.labels(run=self.run).set(0)
        self.server.shutdown()
        self.server.server_close()
