"""The coordinator's Prometheus metrics: one registry per run, updated from each typed metrics row."""

from __future__ import annotations

from fedseek.outputs.schema import FederatedEvalRow, MetricsRow


class PrometheusMetrics:
    """The coordinator's Prometheus metrics (own registry), served on host:port while the run lives."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, run: str = "") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.round = Gauge("fedseek_round", "last completed round", registry=self.registry)
        self.participants = Gauge("fedseek_round_participants", "sites whose update was aggregated this round", registry=self.registry)
        self.sampled = Gauge("fedseek_round_sampled", "sites asked to train this round", registry=self.registry)
        self.round_seconds = Gauge("fedseek_round_seconds", "wall time of the last round", registry=self.registry)
        self.accuracy = Gauge("fedseek_accuracy", "central test accuracy of the global model", registry=self.registry)
        self.loss = Gauge("fedseek_loss", "central test loss of the global model", registry=self.registry)
        self.rejected = Counter("fedseek_rejected_updates", "updates rejected by validation", ["reason"], registry=self.registry)
        self.refused = Counter("fedseek_refused_rounds", "rounds refused by sites (privacy budget)", registry=self.registry)
        self.failed = Counter("fedseek_failed_replies", "error replies and time-outs", registry=self.registry)
        self.bytes = Counter("fedseek_bytes", "payload bytes on the wire", ["direction"], registry=self.registry)
        self.epsilon = Gauge("fedseek_site_epsilon", "privacy spent per site (its ledger, as reported)", ["site"], registry=self.registry)
        self.fed_accuracy = Gauge("fedseek_federated_accuracy", "pooled accuracy on the sites' held-out splits (noisy under DP)",
                                  registry=self.registry)
        self.fed_accuracy_std = Gauge("fedseek_federated_accuracy_std", "noise std of the pooled federated accuracy",
                                      registry=self.registry)
        self.eval_epsilon = Gauge("fedseek_site_evaluation_epsilon", "evaluation privacy spent per site (its evaluation ledger)",
                                  ["site"], registry=self.registry)
        self.wm_p = Gauge("fedseek_watermark_p_value", "watermark p-value after embedding", registry=self.registry)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, int(self.server.server_port)

    def observe_round(self, row: MetricsRow) -> None:
        """Update every metric from one metrics.jsonl row."""
        self.round.set(row.round)
        self.participants.set(row.accepted)
        self.sampled.set(row.sampled)
        self.round_seconds.set(row.round_seconds)
        if row.central.get("accuracy") is not None:
            self.accuracy.set(float(row.central["accuracy"] or 0.0))
            self.loss.set(float(row.central.get("loss") or 0.0))
        for r in row.rejections:
            self.rejected.labels(reason=r.reason.split(" ")[0][:40]).inc()
        self.refused.inc(row.refused)
        self.failed.inc(row.failed + row.timed_out)
        self.bytes.labels(direction="up").inc(row.bytes_up)
        self.bytes.labels(direction="down").inc(row.bytes_down)
        for site, view in row.sites.items():
            if view.epsilon is not None:
                self.epsilon.labels(site=site).set(view.epsilon)
        if row.watermark is not None:
            self.wm_p.set(row.watermark.p_value)
        if row.federated is not None:
            self.observe_federated(row.federated)

    def observe_federated(self, fed: FederatedEvalRow) -> None:
        """Pooled federated accuracy (with its noise std) and each site's evaluation epsilon."""
        if fed.accuracy is not None:
            self.fed_accuracy.set(fed.accuracy)
            self.fed_accuracy_std.set(fed.accuracy_std or 0.0)
        for site, view in fed.sites.items():
            if view.epsilon is not None:
                self.eval_epsilon.labels(site=site).set(view.epsilon)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
