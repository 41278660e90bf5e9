"""The coordinator's watermark stage: one key per run, embedded into the aggregate after every round.

Embedding fine-tunes on the secret trigger set only (no site data: zero privacy cost) and
keeps the sparsity mask; detection is re-measured after each embedding and on the final model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedseek import watermark as wm
from fedseek.config import WatermarkSpec
from fedseek.outputs.schema import WatermarkRound, WatermarkSummary
from fedseek.runtime.global_model import GlobalModel
from fedseek.runtime.log import flwr_log


class WatermarkStage:
    """Key loading (or generation) and per-round embedding."""

    def __init__(self, spec: WatermarkSpec, input_shape: tuple[int, ...], num_classes: int, out_dir: Path, *, seed: int, name: str) -> None:
        self.spec, self.seed = spec, seed
        self.history: list[dict[str, Any]] = []
        path = Path(spec.key_file) if spec.key_file else out_dir / "watermark.key"
        if path.exists():
            key = wm.load_key(path)
            if tuple(key.input_shape) != tuple(input_shape) or key.num_classes != num_classes:
                raise ValueError(f"watermark key {path} is for shape {key.input_shape} / {key.num_classes} classes, "
                                 f"not this task's {tuple(input_shape)} / {num_classes}")
        else:
            key = wm.keygen(tuple(input_shape), int(num_classes), spec.triggers, model_id=name)
            wm.save_key(key, path)
            flwr_log("watermark key generated at %s (commitment %s)", path, wm.commitment(key))
        self.key = key

    def embed(self, rnd: int, model: GlobalModel) -> WatermarkRound:
        """Fine-tune the aggregate on the trigger set, re-apply the mask, and measure detection."""
        spec = self.spec
        rep = wm.embed(model.load_module(), self.key, target_accuracy=spec.target_trigger_accuracy, max_steps=spec.max_steps,
                       seed=self.seed + rnd, lr=spec.lr, distill_weight=spec.distill_weight, mask=model.mask)
        model.take_module()
        res = wm.verify_model(model.load_module(), self.key, alpha=spec.alpha)
        row = WatermarkRound(steps=rep.steps, trigger_accuracy_before=rep.trigger_accuracy_before, trigger_accuracy=res.matches / res.n,
                             matches=res.matches, n=res.n, p_value=res.p_value, detected=res.detected, seconds=rep.seconds)
        self.history.append({"round": rnd, **row.model_dump()})
        return row

    def summary(self, model: GlobalModel) -> WatermarkSummary:
        """Detection on the final model and the key's public commitment."""
        res = wm.verify_model(model.load_module(), self.key, alpha=self.spec.alpha)
        return WatermarkSummary(p_value=res.p_value, matches=res.matches, n=res.n, num_classes=res.num_classes, detected=res.detected,
                                alpha=res.alpha, commitment=wm.commitment(self.key), embed_seconds=sum(h["seconds"] for h in self.history))

    def state_dict(self) -> dict[str, Any]:
        """The embedding history (the key itself lives in its own file)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the embedding history."""
        self.history = list(state["history"])
