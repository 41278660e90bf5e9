"""The coordinator's round loop (inside Flower's ServerApp, in simulation and deployment alike).

Per round: the strategy wrapper samples sites and builds their messages, the Grid carries
them, the wrapper screens the replies and its inner Flower strategy aggregates; then the
global model is pruned and watermarked (post-processing), evaluated centrally (and, when due,
on the sites' held-out splits: `runtime.federated_eval`), and one metrics row and a checkpoint
are written atomically. Every reply is named by its sender's identity (`runtime.identity`: the
registered key in deployment), never by what it writes. summary.json says honestly how the run
ended (`status`: completed / stopped / failed, and a one-line `stop_reason`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from fedseek.outputs.model_card import build_card, preprocessing_facts
from fedseek.outputs.schema import (
    CompressionSummary,
    DeliveryModel,
    DistillationSummary,
    FederatedEvalRow,
    MetricsRow,
    RunSummary,
    read_rows,
)
from fedseek.outputs.store import RunOutputs
from fedseek.runtime import checkpoint
from fedseek.runtime.bookkeeping import RunBook
from fedseek.runtime.distillation import TEACHER_RECORD, distill_meta
from fedseek.runtime.exchange import send_and_receive
from fedseek.runtime.federated_eval import FederatedEvaluator, due
from fedseek.runtime.federated_scaling import ScalingFitter, scaling_request
from fedseek.runtime.global_model import GlobalModel
from fedseek.runtime.log import flwr_log
from fedseek.runtime.nodes import QUERY_SHARE, NodeTracker
from fedseek.runtime.rules import build_rule
from fedseek.runtime.secure_round import secure_exchange
from fedseek.runtime.selection import Selection, baseline_check
from fedseek.runtime.strategy import SiteStrategy
from fedseek.runtime.task import RunPlan, apply_fitted, model_meta, plan_from_context
from fedseek.serving.teacher import Teacher
from fedseek.wire.records import FittedScaling, RoundConfig

if TYPE_CHECKING:
    from fedseek.runtime.watermarking import WatermarkStage


def run_coordinator(grid: Grid, context: Context) -> RunSummary:
    """Run the whole federation described by the run config; returns the summary written."""
    return Coordinator(grid, plan_from_context(context)).run()


class Coordinator:
    """One federated run at the coordinator: wires the stateful parts together and runs the rounds."""

    def __init__(self, grid: Grid, plan: RunPlan) -> None:
        self.grid, self.plan, self.cfg = grid, plan, plan.cfg
        cfg, task = plan.cfg, plan.task
        self.out = RunOutputs(plan.out_dir)
        self.meta = model_meta(cfg, task)
        self.model = GlobalModel(cfg, task.input_shape, task.num_classes)
        self.codec = cfg.compression.codec_spec(cfg.seed)
        self.nodes = NodeTracker(grid, plan.run_id, self.audit, node_wait_s=plan.node_wait_s, keys=plan.site_keys,
                                 query_timeout_s=min(plan.node_wait_s, QUERY_SHARE * cfg.round_timeout_s))
        self.strategy = SiteStrategy(
            build_rule(cfg.strategy), self.nodes, fraction_train=cfg.strategy.fraction_train, min_sites=cfg.strategy.min_sites,
            seed=cfg.seed, downlink=cfg.compression.downlink, max_update_norm=cfg.validation.max_update_norm, validation=cfg.validation,
            max_payload_bytes=cfg.validation.max_payload_bytes or 2 * self.model.dense_bytes + 4096)
        self.book = RunBook()
        self.evaluator = FederatedEvaluator(
            grid, self.nodes, self.audit, meta=self.meta, run_id=plan.run_id, timeout_s=cfg.round_timeout_s,
            downlink=cfg.compression.downlink, data_schema=plan.task.schema,
            target_std=task.target_scale[1] if task.target_scale else None) if cfg.evaluation.every > 0 else None
        self.watermark: WatermarkStage | None = None
        if cfg.watermark.enabled:  # imported only when used: scipy.stats alone takes ~1 s
            from fedseek.runtime.watermarking import WatermarkStage

            self.watermark = WatermarkStage(cfg.watermark, task.input_shape, task.num_classes, self.out.dir, seed=cfg.seed, name=cfg.name)
        self.selection = Selection(cfg.selection)
        request = scaling_request(task)
        self.scaling = ScalingFitter(request, run_id=plan.run_id, timeout_s=cfg.round_timeout_s,
                                     data_schema=task.schema) if request is not None else None
        self.teacher: Teacher | None = None
        if cfg.distill is not None:  # checked before any site is asked (DistillError: one line)
            from fedseek.serving.teacher import check_student, load_teacher
            from fedseek.wire.transfer import to_record

            self.teacher = load_teacher(cfg.distill)
            schema = task.schema
            check_student(self.teacher, self.meta, features=schema.features if schema else None, classes=schema.classes if schema else None)
            self.strategy.extra = {TEACHER_RECORD: to_record(self.teacher.arrays)}
        self.round = 0
        self.initial: dict[str, float] | None = None
        self.stop_reason: str | None = None

    def parts(self) -> dict[str, checkpoint.Stateful]:
        """Every stateful part, as the checkpoint collects them."""
        parts: dict[str, checkpoint.Stateful] = {"model": self.model, "strategy": self.strategy, "book": self.book, "nodes": self.nodes,
                                                 "selection": self.selection}
        if self.watermark is not None:
            parts["watermark"] = self.watermark
        if self.scaling is not None:
            parts["scaling"] = self.scaling
        return parts

    def audit(self, event: str, **fields: Any) -> None:
        """One line in OUT/audit.jsonl: joins, refusals, rejections, failures, checkpoints."""
        self.out.audit(event, run_id=self.plan.run_id, **fields)

    def round_config(self, rnd: int) -> RoundConfig:
        """What every sampled site is asked to do this round."""
        t, s = self.cfg.train, self.cfg.strategy
        return RoundConfig(
            server_round=rnd, num_rounds=self.cfg.rounds, lr=t.lr, local_epochs=t.local_epochs, batch_size=t.batch_size,
            momentum=t.momentum, weighting=t.class_weighting, proximal_mu=s.proximal_mu if s.name == "fedprox" else 0.0,
            recipe=t.recipe, model=self.meta, seed=int(self.cfg.seed), run_id=self.plan.run_id, codec=dataclasses.asdict(self.codec),
            data_schema=self.plan.task.schema, scaling=self.fitted,
            distill=distill_meta(self.cfg.distill, self.teacher) if self.cfg.distill and self.teacher else None)

    @property
    def fitted(self) -> FittedScaling | None:
        """The federation's fitted scaling statistics (scaling: federated), None otherwise or before they are computed."""
        return self.scaling.fitted if self.scaling is not None else None

    def run(self) -> RunSummary:
        """Resume or start, wait for the sites, run the remaining rounds, write the summary."""
        start = time.time()
        first = self._resume() + 1 if self.plan.resume else 1
        if first == 1:
            self.out.reset_metrics()
        nodes = self.nodes.wait_for(self.plan.expected_sites)
        flwr_log("%d sites connected; rounds %d..%d of %s", len(nodes), first, self.cfg.rounds, self.cfg.strategy.name)
        if not self._fit_scaling():
            return self.finish(start)
        if self.initial is None:
            self.initial = self.model.evaluate(self.plan.task.test)
        for rnd in range(first, self.cfg.rounds + 1):
            row = self.run_round(rnd)
            if row is None:
                break
            if self.selection.observe(rnd, self.selection.judged(row), self.model.released):
                flwr_log("early stop after round %d: no %s improvement in %d rounds", rnd, self.cfg.selection.metric,
                         self.cfg.selection.patience)
                self.audit("early_stopped", round=rnd, metric=self.cfg.selection.metric, patience=self.cfg.selection.patience)
                break
        return self.finish(start)

    def _fit_scaling(self) -> bool:
        """scaling: federated: the sites' statistics before round 1 (kept across a resume); False when none could be had."""
        if self.scaling is None:
            return True
        if self.scaling.fitted is None and self.scaling.fit(self.grid, self.nodes, self.audit) is None:
            self.stop_reason = ("stopped before round 1: no site gave usable scaling statistics (scaling: federated); "
                                "see audit.jsonl for each site's answer")
            self.audit("stopped_early", round=0, reason=self.stop_reason)
            return False
        assert self.scaling.fitted is not None
        apply_fitted(self.plan.task, self.scaling.fitted)
        if self.evaluator is not None:
            self.evaluator.scaling = self.scaling.fitted
            self.evaluator.target_std = self.plan.task.target_scale[1] if self.plan.task.target_scale else None
        return True

    def run_round(self, rnd: int) -> MetricsRow | None:
        """One round end to end; None when no site is left to ask (every one excluded).

        A site that sends nothing costs the round at most round_timeout_s: the simulation's
        QUERY for new nodes and the training share that one budget, and a site that keeps
        timing out is left out of the next rounds (back-off) instead of being waited for.
        """
        t0 = time.time()
        self.strategy.mask = self.model.mask
        msgs = list(self.strategy.configure_train(rnd, self.model.record(), self.round_config(rnd).to_record(), self.grid))
        waiting = self.nodes.round.skipped or self.nodes.round.silent  # left out this round, asked again later
        if not msgs and not waiting:
            excluded = len(self.strategy.excluded)
            self.stop_reason = f"stopped before round {rnd}: every site is excluded ({excluded} out of privacy budget or refused)"
            flwr_log("%s", self.stop_reason)
            self.audit("stopped_early", round=rnd, reason=self.stop_reason)
            return None
        timeout = max(self.cfg.round_timeout_s - self.nodes.round.query_seconds, 0.0)
        secure = self.cfg.secure_aggregation
        if msgs and secure is not None and secure.enabled:  # distributed DP: only the SecAgg+ sum is ever unmasked
            shapes = [tuple(np.shape(v)) for v in self.model.arrays.values()]
            aggregate, _ = self.strategy.aggregate_secure(rnd, secure_exchange(self.grid, rnd, msgs, secure, timeout or None, shapes))
        else:
            replies = send_and_receive(self.grid, msgs, timeout=timeout) if msgs else []
            aggregate, _ = self.strategy.aggregate_train(rnd, replies)
        outcome = self.strategy.outcome
        self.nodes.after_round(outcome.sampled, outcome.timed_out)
        self._audit_round(rnd, outcome)
        if aggregate is not None:
            self.model.set_record(aggregate)
        sparsity = self.model.update_mask(rnd)
        wm_row = self.watermark.embed(rnd, self.model) if self.watermark is not None else None
        self.model.update_average()
        central = self.model.evaluate(self.plan.task.test)
        row = self.book.record_round(rnd, outcome, self.nodes, started=t0, central=central, codec=self.codec.kind, sparsity=sparsity,
                                     watermark=wm_row, federated=self.federated_evaluation(rnd))
        self.out.append_metrics(row)
        if wm_row is not None:
            self.audit("watermark_embedded", round=rnd, steps=wm_row.steps, p_value=wm_row.p_value)
        self.round = rnd
        checkpoint.save(self.out.checkpoint_dir, rnd, self.plan.run_id, self.parts(), {"initial": self.initial})
        self.audit("checkpoint", round=rnd)
        flwr_log("round %d/%d: %s (%d accepted, %d rejected, %d refused, %d failed) %.1fs", rnd, self.cfg.rounds, headline(central),
                 row.accepted, row.rejected, row.refused, row.failed + row.timed_out, row.round_seconds)
        return row

    def federated_evaluation(self, rnd: int) -> FederatedEvalRow | None:
        """The sites evaluate the global model on their held-out splits when due (None otherwise); refusing sites are not asked again."""
        if self.evaluator is None or not due(rnd, self.cfg.evaluation.every, self.cfg.rounds):
            return None
        return self.evaluator.evaluate(rnd, self.model, excluded={*self.strategy.excluded, *self.book.federated.excluded()})

    def _audit_round(self, rnd: int, outcome: Any) -> None:
        timeout = self.cfg.round_timeout_s
        for n in outcome.timed_out:
            flwr_log("site %s (node %d) sent no reply within round_timeout_s %.0fs", self.nodes.names.get(n, "?"), n, timeout)
            self.audit("site_timed_out", round=rnd, site=self.nodes.names.get(n, ""), node_id=n, timeout_s=timeout)
        s = outcome.screened
        for r in s.refused:
            self.audit("site_refused", round=rnd, site=r.site, reason=r.reason)
        for r in s.rejected:
            self.audit("update_rejected", round=rnd, site=r.site, reason=r.reason)
        for r in s.failed:
            self.audit("site_failed", round=rnd, site=r.site, node_id=r.node_id, reason=r.reason)

    def _resume(self) -> int:
        """Restore the last checkpoint of this run directory; the last completed round (0 without one)."""
        state = checkpoint.load(self.out.checkpoint_dir, self.parts())
        if state is None:
            flwr_log("--resume: no checkpoint in %s, starting from round 1", self.out.checkpoint_dir)
            return 0
        self.round, self.initial = int(state["round"]), state["initial"]
        self.out.truncate_metrics(self.round)
        self.audit("resumed", round=self.round)
        flwr_log("resuming after round %d from %s", self.round, self.out.checkpoint_dir)
        return self.round

    def finish(self, started: float) -> RunSummary:
        """Evaluate the final model, save it and write summary.json."""
        cfg, totals, codec = self.cfg, self.book.totals, self.codec
        final = self.model.evaluate(self.plan.task.test)
        rows = read_rows(self.out.metrics_path)
        status, reason = self.status(rows)
        selected = self.selection.summary(rows[-1].round if rows else 0)
        released = self.model.released
        kept = self.selection.best_arrays if self.selection.active and self.selection.best_arrays is not None else released
        kept_metrics, kept_pred = self.model.evaluate_arrays(kept, self.plan.task.test)
        baseline = baseline_check(self.plan.task.test, kept_metrics, kept_pred)
        summary = RunSummary(
            name=cfg.name, run_id=self.plan.run_id, rounds=cfg.rounds, rounds_completed=len(rows), status=status,
            num_sites=self.plan.expected_sites, strategy=cfg.strategy.name, dataset=self.plan.task.name, seed=cfg.seed,
            initial=self.initial, final=final, final_accuracy=final.get("accuracy"),
            privacy=self.book.privacy_summary(self.plan.privacy, cfg.secure_aggregation),
            bytes_up=totals["bytes_up"], wire_bytes_up=totals["wire_bytes_up"], dense_bytes_up=totals["dense_bytes_up"],
            bytes_down=totals["bytes_down"],
            compression=CompressionSummary(codec=codec.kind, topk_fraction=codec.topk_fraction, quantize=codec.quantize,
                                           error_feedback=codec.error_feedback, downlink=cfg.compression.downlink,
                                           ratio_up=(totals["dense_bytes_up"] / totals["bytes_up"]) if totals["bytes_up"] else None),
            sparsity=self.model.sparsity(), rejected_updates=totals["rejected"], rejections=self.book.rejections,
            refused_rounds=totals["refused"], failed_replies=totals["failed"], excluded_sites=dict(self.strategy.excluded),
            watermark=self.watermark.summary(self.model) if self.watermark is not None else None,
            federated_evaluation=self.book.federated.summary(cfg.evaluation.every), stop_reason=reason,
            wall_seconds=time.time() - started, selection=selected, baseline=baseline,
            warnings=[baseline.warning] if baseline is not None and baseline.warning else [],
            scaling=self.scaling.summary if self.scaling is not None else None, distillation=self._distillation(kept))
        self.save_model(summary, kept)
        self.out.write_summary(summary)
        self.audit("run_finished", status=status, reason=reason or "")
        flwr_log("done (%s%s): final %s, summary at %s", status, f": {reason}" if reason else "", headline(final), self.out.summary_path)
        return summary

    def save_model(self, summary: RunSummary, kept: dict[str, Any]) -> None:
        """model.pt (the kept round), model_last.pt and the model card, before summary.json (the run's last output)."""
        schema = self.plan.task.schema
        task = self.plan.task
        card = build_card(self.meta.to_dict(), summary, features=schema.features if schema else None,
                          classes=schema.classes if schema else None,
                          preprocessing=preprocessing_facts(task.preprocess, task.columns, builtin=task.builtin, fitted=self.fitted),
                          target_scale=task.target_scale, parameters=int(sum(np.asarray(v).size for v in kept.values())),
                          average=self.cfg.strategy.ema_decay or None)
        released = self.model.released
        self.out.save_model(kept, card.model_dump(), last=None if kept is released else released)

    def _distillation(self, kept: dict[str, Any]) -> DistillationSummary | None:
        """distill: the teacher and the comparison of teacher, student and INT8 student on the central test set."""
        if self.teacher is None or self.cfg.distill is None:
            return None
        from fedseek.serving.teacher import compare, describe, module_from

        t, spec, test = self.teacher, self.cfg.distill, self.plan.task.test
        models = compare(t, module_from(self.meta, kept), test) if test is not None and len(test.y) else []
        return DistillationSummary(teacher_run=str(t.run_dir), teacher_model=describe(t.meta),
                                   teacher_parameters=t.parameters, temperature=spec.temperature, alpha=spec.alpha,
                                   models=[DeliveryModel(**m) for m in models])

    def status(self, rows: list[MetricsRow]) -> tuple[str, str | None]:
        """completed; stopped (ended before the last round, the model trained); failed (no round changed the model): and why."""
        if any(r.accepted and not r.model_kept for r in rows):
            return ("stopped", self.stop_reason) if self.stop_reason else ("completed", None)
        counts = {k: sum(getattr(r, k) for r in rows) for k in ("refused", "rejected", "failed", "timed_out")}
        kept = sum(1 for r in rows if r.accepted and r.model_kept)
        detail = ", ".join([f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v]
                           + ([f"{kept} aggregate(s) discarded"] if kept else [])) or "no site was asked"
        reason = f"no update was accepted in {len(rows)} round(s) ({detail})"
        return "failed", f"{reason}; {self.stop_reason}" if self.stop_reason else reason


def headline(metrics: dict[str, float]) -> str:
    """The central metrics a log line shows: accuracy and loss, or R² and RMSE for a regression."""
    if "r2" in metrics:
        return f"R² {metrics['r2']:.4f} RMSE {metrics.get('rmse', float('nan')):.4g}"
    return f"accuracy {metrics.get('accuracy', float('nan')):.4f} loss {metrics.get('loss', float('nan')):.4f}"
