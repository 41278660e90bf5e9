"""The coordinator's round loop (run inside Flower's ServerApp, in simulation and deployment alike).

Per round: wait for sites, sample them with the run's seed, send global weights + round
config, screen every reply (bad ones rejected with a reason, budget refusals logged and the
site excluded), aggregate with Flower's strategy, evaluate centrally, write one metrics line
and a checkpoint, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseek.config import FederationSpec, ScenarioConfig, load_scenario
from fedseek.outputs.store import RunOutputs
from fedseek.runtime.rules import build_strategy, prepare_round
from fedseek.sparsity.masks import sparsity_of
from fedseek.train.local import evaluate
from fedseek.train.models import build_model
from fedseek.wire.screening import as_messages, screen_replies
from fedseek.wire.transfer import pack_global

log = logging.getLogger("fedseek.runtime.coordinator")


def _flwr_log(msg: str, *args: Any) -> None:
    """Log through Flower's logger too, so `flwr log` shows our lines."""
    from logging import INFO

    from flwr.common.logger import log as flog

    flog(INFO, "[fedseek] " + msg, *args)


@dataclass
class RunSettings:
    """What the ServerApp gets from Flower's flat run config."""

    config_path: Path
    config_kind: str
    out_dir: Path
    resume: bool = False

    @classmethod
    def from_context(cls, context: Context) -> RunSettings:
        rc = context.run_config
        path = str(rc.get("config-path", ""))
        if not path:
            raise ValueError("run config 'config-path' is empty: start runs with `fedseek simulate` or `fedseek run`")
        return cls(Path(path), str(rc.get("config-kind", "scenario")), Path(str(rc.get("out-dir", "runs/latest"))),
                   bool(rc.get("resume", False)))


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """Block until `expected` sites are registered (Flower otherwise samples fewer in round 1)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {expected} sites connected within {timeout_s:.0f}s")
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    return sorted(nodes)


def model_meta(fed: FederationSpec, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The architecture description sent to sites and saved as model.json."""
    return {"kind": fed.model.kind, "hidden": list(fed.model.hidden), "input_shape": list(input_shape), "num_classes": num_classes}


def _state_to_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def _arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


@dataclass
class Task:
    """What the coordinator knows about the task: shapes, and a held-out test set if it has one."""

    input_shape: tuple[int, ...]
    num_classes: int
    test: Any = None  # fedseek.data.ArrayDataset | None
    name: str = ""


def scenario_task(cfg: ScenarioConfig) -> Task:
    """A scenario's task: the built-in dataset's held-out split is the central test set."""
    from fedseek.data import load_builtin

    _, test = load_builtin(cfg.data.dataset, cfg.seed, test_fraction=cfg.data.test_fraction, **cfg.data.options)
    return Task(tuple(test.input_shape), int(test.num_classes), test, cfg.data.dataset)


def coordinator_task(cfg: Any) -> Task:
    """A deployed coordinator's task (CoordinatorConfig.task): built-in test split, a test table, or shapes only."""
    t = cfg.task
    if t.dataset:
        from fedseek.data import load_builtin

        _, test = load_builtin(t.dataset, cfg.seed, test_fraction=t.test_fraction, **t.options)
        return Task(tuple(test.input_shape), int(test.num_classes), test, t.dataset)
    if t.test_file:
        from fedseek.data import load_table

        test = load_table(t.test_file, str(t.label_column), t.feature_columns, standardize=t.standardize, classes=t.classes)
        return Task(tuple(test.input_shape), int(test.num_classes), test, Path(t.test_file).stem)
    return Task(tuple(int(d) for d in t.input_shape), int(t.num_classes), None, cfg.name)


def run_coordinator(grid: Grid, context: Context) -> dict[str, Any]:
    """Run the whole federation described by the run config; returns the summary written."""
    settings = RunSettings.from_context(context)
    if settings.config_kind == "scenario":
        cfg: ScenarioConfig = load_scenario(settings.config_path)
        coord = Coordinator(
            grid, cfg, scenario_task(cfg), settings.out_dir, expected_sites=cfg.num_sites,
            node_wait_s=cfg.simulation.node_wait_s, run_id=str(context.run_id), privacy=cfg.privacy,
        )
        return coord.run(resume=settings.resume)
    if settings.config_kind == "coordinator":
        from fedseek.config import load_coordinator

        ccfg = load_coordinator(settings.config_path)
        coord = Coordinator(
            grid, ccfg, coordinator_task(ccfg), settings.out_dir, expected_sites=int(ccfg.expected_sites or ccfg.strategy.min_sites),
            node_wait_s=ccfg.node_wait_s, run_id=str(context.run_id), privacy=ccfg.privacy,
        )
        return coord.run(resume=settings.resume)
    raise ValueError(f"config-kind {settings.config_kind!r} not supported (allowed: scenario, coordinator)")


class Coordinator:
    """State of one federated run at the coordinator."""

    def __init__(
        self,
        grid: Grid,
        cfg: FederationSpec,
        task: Task,
        out_dir: Path,
        *,
        expected_sites: int,
        node_wait_s: float = 120.0,
        run_id: str = "",
        privacy: Any = None,
    ) -> None:
        self.grid, self.cfg, self.task, self.run_id = grid, cfg, task, run_id
        self.expected_sites, self.node_wait_s, self.privacy = expected_sites, node_wait_s, privacy
        self.out = RunOutputs(out_dir)
        self.test = task.test
        self.meta = model_meta(cfg, tuple(task.input_shape), int(task.num_classes))
        self.model = build_model(cfg.model.kind, task.input_shape, task.num_classes, cfg.model.hidden, seed=cfg.seed)
        self.arrays = _state_to_arrays(self.model)
        self.strategy = build_strategy(cfg.strategy)
        self.rng = np.random.default_rng(cfg.seed)
        self.excluded: dict[str, str] = {}  # site name -> reason (e.g. privacy budget spent)
        self.names: dict[int, str] = {}  # node id -> site name
        self.seen_nodes: set[int] = set()  # every node Flower has listed during this run
        self.lost_nodes: set[int] = set()  # listed earlier, not listed now (dead, or its heartbeat expired)
        self.round = 0
        self.stop_reason: str | None = None
        self.initial: dict[str, float] | None = None
        dense = int(sum(a.nbytes for a in self.arrays.values()))
        self.max_payload_bytes = cfg.validation.max_payload_bytes or 2 * dense + 4096
        self.sites: dict[str, dict[str, Any]] = {}  # site name -> latest privacy / participation view
        self.totals = {"bytes_up": 0, "wire_bytes_up": 0, "bytes_down": 0, "dense_bytes_up": 0, "rejected": 0, "refused": 0, "failed": 0}
        self.rejections: list[dict[str, Any]] = []
        self.codec = cfg.compression.codec_spec(cfg.seed)
        self.mask: dict[str, np.ndarray] | None = None
        if cfg.sparsity.enabled and cfg.sparsity.schedule == "fixed":
            from fedseek.sparsity.masks import init_mask

            # data-independent: drawn from the run's seed before any site trains
            self.mask = init_mask(self.arrays, cfg.sparsity.target, seed=cfg.seed)
            self._apply_mask()
        self.wm_key: Any = None
        self.wm_history: list[dict[str, Any]] = []
        if cfg.watermark.enabled:
            self.wm_key = self._watermark_key()

    # ------------------------------------------------------------------ sparsity + watermark
    def _apply_mask(self) -> None:
        if self.mask is None:
            return
        from fedseek.sparsity.masks import canonical_name

        for k in self.arrays:
            m = self.mask.get(canonical_name(k))
            if m is not None:
                self.arrays[k] = np.where(m, self.arrays[k], 0.0).astype(np.float32)

    def _update_mask(self, rnd: int) -> float:
        """Progressive magnitude pruning of the (DP) global model: post-processing, no privacy cost."""
        sp = self.cfg.sparsity
        if not sp.enabled:
            return 0.0
        from fedseek.sparsity.masks import magnitude_mask, prune_and_regrow, schedule_sparsity, sparsity_of

        if sp.schedule == "progressive":
            target = schedule_sparsity(rnd, self.cfg.rounds, sp.target, start_round=sp.start_round, end_fraction=sp.end_fraction)
            current = sparsity_of(self.mask) if self.mask is not None else 0.0
            if target > current + 1e-9:
                self.mask = magnitude_mask(self.arrays, target)
            elif sp.regrow_fraction > 0 and self.mask is not None and target >= sp.target - 1e-9:
                self.mask = prune_and_regrow(self.arrays, self.mask, sp.regrow_fraction, seed=self.cfg.seed + rnd)
        self._apply_mask()
        return sparsity_of(self.mask) if self.mask is not None else 0.0

    def _watermark_key(self) -> Any:
        from fedseek import watermark as wm

        spec = self.cfg.watermark
        path = Path(spec.key_file) if spec.key_file else self.out.dir / "watermark.key"
        if path.exists():
            key = wm.load_key(path)
            if tuple(key.input_shape) != tuple(self.task.input_shape) or key.num_classes != self.task.num_classes:
                raise ValueError(f"watermark key {path} is for shape {key.input_shape} / {key.num_classes} classes, "
                                 f"not this task's {tuple(self.task.input_shape)} / {self.task.num_classes}")
            return key
        key = wm.keygen(tuple(self.task.input_shape), int(self.task.num_classes), spec.triggers, model_id=self.cfg.name)
        wm.save_key(key, path)
        _flwr_log("watermark key generated at %s (commitment %s)", path, wm.commitment(key))
        return key

    def _embed_watermark(self, rnd: int) -> dict[str, Any]:
        """Fine-tune the aggregate on the secret trigger set (no site data: zero privacy cost)."""
        from fedseek import watermark as wm

        spec = self.cfg.watermark
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})
        extra = {"distill_weight": spec.distill_weight} if spec.distill_weight is not None else {}
        rep = wm.embed(self.model, self.wm_key, target_accuracy=spec.target_trigger_accuracy, max_steps=spec.max_steps, seed=self.cfg.seed + rnd,
                       optimizer=spec.optimizer, lr=spec.lr, margin_steps=spec.margin_steps, mask=self.mask, **extra)
        self.arrays = _state_to_arrays(self.model)
        self._apply_mask()
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})
        res = wm.verify_model(self.model, self.wm_key, alpha=spec.alpha)
        row = {"steps": rep.steps, "trigger_accuracy_before": rep.trigger_accuracy_before,
               "trigger_accuracy": res.matches / res.n, "matches": res.matches, "n": res.n,
               "p_value": res.p_value, "detected": res.detected, "seconds": rep.seconds}
        self.wm_history.append({"round": rnd, **row})
        return row

    # ------------------------------------------------------------------ helpers
    def _round_config(self, rnd: int) -> ConfigRecord:
        t = self.cfg.train
        return ConfigRecord(
            {
                "server-round": rnd,
                "num-rounds": self.cfg.rounds,
                "lr": t.lr,
                "local-epochs": t.local_epochs,
                "batch-size": t.batch_size,
                "momentum": t.momentum,
                "weighting": t.class_weighting,
                "proximal-mu": self.cfg.strategy.proximal_mu if self.cfg.strategy.name == "fedprox" else 0.0,
                "model": json.dumps(self.meta),
                "seed": int(self.cfg.seed),
                "run-id": self.run_id,
                "codec": json.dumps(dataclasses.asdict(self.codec)),
            }
        )

    def _discover(self, nodes: list[int]) -> None:
        """Ask nodes we have not met yet which site they are (stable names make sampling and resume reproducible)."""
        new = [n for n in nodes if n not in self.names]
        if not new:
            return
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"run-id": self.run_id})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        for reply in self.grid.send_and_receive(msgs, timeout=min(self.node_wait_s, self.cfg.round_timeout_s)):
            node = int(reply.metadata.src_node_id)
            if reply.has_error() or "site" not in reply.content.config_records:
                continue
            name = str(reply.content.config_records["site"].get("name", "")) or f"node-{node}"
            self.names[node] = name
            self.audit("site_joined", site=name, node_id=node)

    def _alive(self) -> list[int]:
        """Nodes to use this round: wait (bounded) only for sites that never connected, then go on with whoever is there.

        A site that was connected and vanished (Flower stops listing a SuperNode whose heartbeat
        expired) is not waited for: the round goes on with the sites alive, and the site is used
        again as soon as Flower lists it again. Waiting `node_wait_s` for it in every round would
        stall the whole run.
        """
        need = self.cfg.strategy.min_sites
        deadline = time.monotonic() + self.node_wait_s
        nodes = sorted(self.grid.get_node_ids())
        while (not nodes or len(self.seen_nodes | set(nodes)) < need) and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no site connected within {self.node_wait_s:.0f}s")
        listed = set(nodes)
        lost = self.seen_nodes - listed
        for n in sorted(lost - self.lost_nodes):
            _flwr_log("site %s (node %d) is gone: Flower no longer lists it (no heartbeat); going on without it",
                      self.names.get(n, "?"), n)
            self.audit("site_lost", round=self.round + 1, site=self.names.get(n, ""), node_id=n)
        for n in sorted(self.lost_nodes & listed):
            _flwr_log("site %s (node %d) is back", self.names.get(n, "?"), n)
            self.audit("site_rejoined", round=self.round + 1, site=self.names.get(n, ""), node_id=n)
        self.lost_nodes = lost
        self.seen_nodes |= listed
        if len(nodes) < need:
            _flwr_log("only %d of %d sites alive: going on with them", len(nodes), need)
        self._discover(nodes)
        return nodes

    def _sample(self, nodes: list[int]) -> list[int]:
        """Seeded choice over site names (node ids change between runs, names do not)."""
        by_name = {self.names.get(n, f"node-{n}"): n for n in nodes}
        eligible = sorted(name for name in by_name if name not in self.excluded)
        k = max(1, int(round(len(eligible) * self.cfg.strategy.fraction_train)))
        if k < len(eligible):
            eligible = sorted(str(x) for x in self.rng.choice(eligible, size=k, replace=False))
        return [by_name[name] for name in eligible]

    def _evaluate(self) -> dict[str, float]:
        if self.test is None:
            return {}
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in self.arrays.items()})
        return evaluate(self.model, self.test.x, self.test.y, self.test.num_classes)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        start = time.time()
        first = 1
        if resume and self._restore():
            first = self.round + 1
            _flwr_log("resuming after round %d from %s", self.round, self.out.checkpoint_dir)
        else:
            self.out.reset_metrics()
            self.initial = None
        nodes = wait_for_nodes(self.grid, self.expected_sites, self.node_wait_s)
        self._discover(nodes)
        _flwr_log("%d sites connected; rounds %d..%d of %s", len(nodes), first, cfg.rounds, cfg.strategy.name)
        if self.initial is None:
            self.initial = self._evaluate()
        self.prom = None
        if cfg.metrics.prometheus_port is not None:
            from fedseek.outputs.store import PrometheusMetrics

            self.prom = PrometheusMetrics(cfg.metrics.prometheus_host, cfg.metrics.prometheus_port)
            _flwr_log("Prometheus metrics on http://%s:%d/metrics", self.prom.host, self.prom.port)
            self.audit("metrics_endpoint", host=self.prom.host, port=self.prom.port)
        try:
            return self._rounds(first, start)
        finally:
            if self.prom is not None:
                self.prom.close()

    def _rounds(self, first: int, start: float) -> dict[str, Any]:
        cfg = self.cfg
        for rnd in range(first, cfg.rounds + 1):
            t0 = time.time()
            nodes = self._alive()
            sampled = self._sample(nodes)
            if not sampled:
                self.stop_reason = f"stopped before round {rnd}: every site is excluded ({len(self.excluded)} out of privacy budget or refused)"
                _flwr_log("%s", self.stop_reason)
                self.audit("stopped_early", round=rnd, reason=self.stop_reason)
                break
            prepare_round(self.strategy, _arrays_to_record(self.arrays))
            records, payload_down = pack_global(self.arrays, self.mask, cfg.compression.downlink)
            content = RecordDict({**records, "config": self._round_config(rnd)})
            msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
            bytes_down = payload_down * len(sampled)
            replies = list(self.grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
            # push_messages set each message's id: map replies to the node they were sent to (Flower's own error
            # replies for an unavailable node come from the SuperLink, src_node_id 1, not from the node)
            dst = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in msgs}
            answered = {r.metadata.reply_to_message_id for r in replies}
            named = "" not in dst and len(dst) == len(msgs)  # False only for a Grid that sets no message ids
            missing = sorted(n for mid, n in dst.items() if mid not in answered) if named else []
            for r in replies:
                if not r.has_error() and "site" in r.content.config_records:
                    self.names.setdefault(int(r.metadata.src_node_id), str(r.content.config_records["site"].get("name", "")))
            screened = screen_replies(replies, self.arrays, mask=self.mask, max_update_norm=cfg.validation.max_update_norm,
                                      max_payload_bytes=self.max_payload_bytes)
            for r in screened.failed:
                r["node_id"] = dst.get(r.pop("reply_to", ""), r["node_id"])
                r["site"] = self.names.get(r["node_id"], "")
            for n in missing:
                _flwr_log("site %s (node %d) sent no reply within round_timeout_s %.0fs", self.names.get(n, "?"), n, cfg.round_timeout_s)
                self.audit("site_timed_out", round=rnd, site=self.names.get(n, ""), node_id=n, timeout_s=cfg.round_timeout_s)
            screened.accepted.sort(key=lambda r: (r.site, r.node_id))  # aggregation order independent of arrival
            for r in screened.refused:
                self.excluded[r["site"] or f"node-{r['node_id']}"] = r["reason"]
                self.audit("site_refused", round=rnd, site=r["site"], reason=r["reason"])
            for r in screened.rejected:
                self.audit("update_rejected", round=rnd, site=r["site"], reason=r["reason"])
            for r in screened.failed:
                self.audit("site_failed", round=rnd, site=r["site"], node_id=r["node_id"], reason=r["reason"])
            timed_out = len(missing) if named else max(0, len(sampled) - len(replies))
            row_sites = self._update_sites(rnd, screened)
            if screened.accepted:
                new, agg_metrics = self.strategy.aggregate_train(rnd, as_messages(screened.accepted))
                if new is not None:
                    self.arrays = {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in new.items()}
            sparsity = self._update_mask(rnd)
            wm_row = self._embed_watermark(rnd) if self.wm_key is not None else None
            central = self._evaluate()
            self.totals["bytes_up"] += screened.bytes_up
            self.totals["wire_bytes_up"] += screened.wire_bytes_up
            self.totals["dense_bytes_up"] += int(sum(r.metrics.get("dense-bytes", 0) for r in screened.accepted))
            self.totals["bytes_down"] += bytes_down
            self.totals["rejected"] += len(screened.rejected)
            self.totals["refused"] += len(screened.refused)
            self.totals["failed"] += len(screened.failed) + timed_out
            self.rejections += [{"round": rnd, **r} for r in screened.rejected]
            n_acc = len(screened.accepted)
            train_loss = (
                sum(r.metrics.get("train-loss", 0.0) * r.num_examples for r in screened.accepted)
                / max(1, sum(r.num_examples for r in screened.accepted))
                if n_acc
                else None
            )
            row = {
                "round": rnd,
                "time": time.time(),
                "round_seconds": time.time() - t0,
                "sampled": len(sampled),
                "accepted": n_acc,
                "rejected": len(screened.rejected),
                "refused": len(screened.refused),
                "failed": len(screened.failed),
                "timed_out": timed_out,
                "timed_out_sites": [self.names.get(n, f"node-{n}") for n in missing],
                "failures": [{"site": r["site"], "reason": r["reason"]} for r in screened.failed],
                "rejections": screened.rejected,
                "refusals": [{"site": r["site"], "reason": r["reason"]} for r in screened.refused],
                "train_loss": train_loss,
                "central": central,
                "bytes_up": screened.bytes_up,
                "wire_bytes_up": screened.wire_bytes_up,
                "bytes_down": bytes_down,
                "codec": self.codec.kind,
                "sparsity": sparsity,
                "watermark": wm_row,
                "sites": row_sites,
            }
            self.out.append_metrics(row)
            if self.prom is not None:
                self.prom.observe_round(row)
            if wm_row is not None:
                self.audit("watermark_embedded", round=rnd, steps=wm_row["steps"], p_value=wm_row["p_value"])
            self.round = rnd
            self._checkpoint(rnd)
            _flwr_log(
                "round %d/%d: accuracy %.4f loss %.4f (%d accepted, %d rejected, %d refused, %d failed) %.1fs",
                rnd, cfg.rounds, central.get("accuracy", float("nan")), central.get("loss", float("nan")), n_acc, len(screened.rejected),
                len(screened.refused), len(screened.failed) + timed_out, row["round_seconds"],
            )
        final = self._evaluate()
        self.out.save_model(self.arrays, self.meta)
        summary = {
            "name": cfg.name,
            "run_id": self.run_id,
            "rounds": cfg.rounds,
            "rounds_completed": len(_rounds_in(self.out.metrics_path)),
            "num_sites": self.expected_sites,
            "strategy": cfg.strategy.name,
            "dataset": self.task.name,
            "seed": cfg.seed,
            "initial": self.initial,
            "final": final,
            "final_accuracy": final.get("accuracy"),
            "privacy": self._privacy_summary(),
            "bytes_up": self.totals["bytes_up"],
            "wire_bytes_up": self.totals["wire_bytes_up"],
            "dense_bytes_up": self.totals["dense_bytes_up"],
            "bytes_down": self.totals["bytes_down"],
            "compression": {"codec": self.codec.kind, "topk_fraction": self.codec.topk_fraction, "quantize": self.codec.quantize,
                            "error_feedback": self.codec.error_feedback, "downlink": cfg.compression.downlink,
                            "ratio_up": (self.totals["dense_bytes_up"] / self.totals["bytes_up"]) if self.totals["bytes_up"] else None},
            "sparsity": (sparsity_of(self.mask) if self.mask is not None else 0.0),
            "rejected_updates": self.totals["rejected"],
            "rejections": self.rejections,
            "refused_rounds": self.totals["refused"],
            "failed_replies": self.totals["failed"],
            "excluded_sites": dict(self.excluded),
            "watermark": self._watermark_summary(),
            "stop_reason": self.stop_reason,
            "wall_seconds": time.time() - start,
        }
        self.out.write_summary(summary)
        _flwr_log("done: final accuracy %.4f, summary at %s", final.get("accuracy", float("nan")), self.out.summary_path)
        return summary

    def _update_sites(self, rnd: int, screened: Any) -> dict[str, dict[str, Any]]:
        row: dict[str, dict[str, Any]] = {}
        for r in screened.accepted:
            view = {k: r.metrics[k] for k in ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps", "dp-steps-total", "train-loss", "num-examples") if k in r.metrics}
            view["status"] = "trained"
            row[r.site or str(r.node_id)] = view
        for r in screened.refused:
            row[r["site"] or str(r["node_id"])] = {
                "status": "refused",
                **{k: r[k] for k in ("epsilon", "delta", "epsilon-budget", "projected-epsilon") if k in r},
            }
        for name, view in row.items():
            site = self.sites.setdefault(name, {"rounds_trained": 0, "refusals": 0})
            if view["status"] == "trained":
                site["rounds_trained"] += 1
            else:
                site["refusals"] += 1
            site.update({k: v for k, v in view.items() if k != "status"})
            site["last_round"] = rnd
        return row

    def _watermark_summary(self) -> dict[str, Any] | None:
        if self.wm_key is None:
            return None
        from fedseek import watermark as wm

        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()})
        res = wm.verify_model(self.model, self.wm_key, alpha=self.cfg.watermark.alpha)
        return {"p_value": res.p_value, "matches": res.matches, "n": res.n, "num_classes": res.num_classes,
                "detected": res.detected, "alpha": res.alpha, "commitment": wm.commitment(self.wm_key),
                "embed_seconds": sum(h["seconds"] for h in self.wm_history)}

    def _privacy_summary(self) -> dict[str, Any]:
        per_site = {}
        for name, s in sorted(self.sites.items()):
            per_site[name] = {
                "epsilon": s.get("epsilon"),
                "delta": s.get("delta"),
                "steps": s.get("dp-steps-total", None),
                "noise_multiplier": s.get("noise-multiplier"),
                "sample_rate": s.get("sample-rate"),
                "rounds_trained": s["rounds_trained"],
                "refusals": s["refusals"],
            }
        eps = [v["epsilon"] for v in per_site.values() if v["epsilon"] is not None]
        priv = self.privacy
        return {
            "enabled": bool(priv and priv.enabled),
            "accountant": priv.accountant if priv else None,
            "delta": priv.delta if priv else None,
            "epsilon_budget": priv.epsilon_budget if priv else None,
            "max_epsilon": max(eps) if eps else None,
            "sites": per_site,
        }

    def audit(self, event: str, **fields: Any) -> None:
        """One line in OUT/audit.jsonl: joins, refusals, rejections, failures, checkpoints."""
        self.out.audit(event, run_id=self.run_id, **fields)

    def _checkpoint(self, rnd: int) -> None:
        """Everything needed to continue after a crash, in ONE file replaced atomically."""
        import io

        from fedseek.files import atomic_write_bytes, atomic_write_json
        from fedseek.runtime.rules import strategy_state

        state = {
            "version": 1,
            "round": rnd,
            "run_id": self.run_id,
            "arrays": self.arrays,
            "mask": self.mask,
            "rng": self.rng.bit_generator.state,
            "strategy": strategy_state(self.strategy),
            "totals": self.totals,
            "sites": self.sites,
            "excluded": self.excluded,
            "rejections": self.rejections,
            "wm_history": self.wm_history,
            "initial": self.initial,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.out.checkpoint_dir / "state.pt", buf.getvalue())
        atomic_write_json(self.out.checkpoint_dir / "state.json", {"round": rnd, "run_id": self.run_id, "time": time.time()})
        self.audit("checkpoint", round=rnd)

    def _restore(self) -> bool:
        """Load checkpoint/state.pt (our own file: weights_only=False is safe here); False if none."""
        from fedseek.runtime.rules import load_strategy_state

        path = self.out.checkpoint_dir / "state.pt"
        if not path.exists():
            _flwr_log("--resume: no checkpoint at %s, starting from round 1", path)
            return False
        state = torch.load(path, weights_only=False)
        if set(state["arrays"]) != set(self.arrays) or any(state["arrays"][k].shape != v.shape for k, v in self.arrays.items()):
            raise ValueError(f"checkpoint {path} does not match this model's architecture")
        self.round = int(state["round"])
        self.arrays = state["arrays"]
        self.mask = state["mask"]
        self.rng.bit_generator.state = state["rng"]
        load_strategy_state(self.strategy, state["strategy"])
        self.totals.update(state["totals"])
        self.sites = state["sites"]
        self.excluded = state["excluded"]
        self.rejections = state["rejections"]
        self.wm_history = state["wm_history"]
        self.initial = state["initial"]
        self.out.truncate_metrics(self.round)
        self.audit("resumed", round=self.round)
        return True


def _rounds_in(path: Path) -> list[int]:
    from fedseek.outputs.store import read_metrics

    return [int(r["round"]) for r in read_metrics(path)]
