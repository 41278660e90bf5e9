"""`fedseek quantize`: INT8 post-training quantization of a run's kept model, with PyTorch's own quantization tooling.

Linear layers (the tabular MLP, the CNN's head) use dynamic quantization when the model has no
convolutions: INT8 weights, activations quantized per batch at run time, no calibration data.
A CNN is quantized statically (FX graph mode on its convolutional block and its head: INT8
weights and activations), which needs calibration rows to fix the activation ranges. Where those
rows come from is explicit and recorded in the card: `synthetic` (inputs drawn at random, no
record of anyone), or a table the operator names (for example the coordinator's own test table,
held in the open; or a site's own records when the quantized model stays at that site, where
local use releases nothing). The quantized model is saved as TorchScript (`model_int8.pt`) next
to a copy of the card with `precision: int8`; `fedseek predict` and `fedseek serve` load it.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.files import atomic_write_bytes
from fedseek.serving.predictor import PredictError, Predictor

INT8_FILE = "model_int8.pt"
SUPPORTED = ("Linear", "Conv2d", "GroupNorm", "Tanh", "AdaptiveAvgPool2d", "Sequential", "TabularMLP", "SmallCNN")


class QuantizeError(ValueError):
    """The run or the calibration data cannot be quantized (one line; exit 2)."""


@dataclass(frozen=True)
class QuantizeResult:
    """What was written, and the sizes."""

    out_dir: Path
    mode: str  # dynamic | static
    fp32_bytes: int
    int8_bytes: int
    calibration: str


def _calibration_rows(predictor: Predictor, source: str, rows: int, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Calibration inputs and the line the card records about them."""
    if source == "synthetic":
        rng = np.random.default_rng(0)
        if len(shape) >= 2:  # images: pixel intensities in [0, 1] as every fedseek image loader gives them
            return rng.uniform(0.0, 1.0, (rows, *shape)).astype(np.float32), "synthetic (uniform [0, 1] pixels; no record of anyone)"
        return rng.normal(0.0, 1.0, (rows, *shape)).astype(np.float32), "synthetic (standard normal features; no record of anyone)"
    from fedseek.data import DataError
    from fedseek.data.loaders import read_table

    try:
        df = read_table(source)
    except DataError as exc:
        raise QuantizeError(str(exc)) from None
    x = predictor.features(df.head(rows), source)
    return x, (f"table {Path(source).name} ({len(x)} rows; held by whoever runs the quantization: the coordinator's own test "
               "table, or a site's records when the quantized model stays at that site)")


def _check_layers(model: Any) -> None:
    unsupported = sorted({type(m).__name__ for m in model.modules()} - set(SUPPORTED))
    if unsupported:
        raise QuantizeError(f"layers {unsupported} are not supported by fedseek's INT8 quantization (supported: {', '.join(SUPPORTED)})")


def _static(model: Any, calib: np.ndarray) -> Any:
    """FX static quantization of the CNN's convolutional block and head; the forward stays the model's own."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    qmap = get_default_qconfig_mapping(engine)
    x = torch.as_tensor(calib)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    with torch.no_grad():
        feats = prepare_fx(model.features, qmap, (x[:2],))
        feats(x)
        flat = model.features(x).flatten(1)
        head = prepare_fx(model.head, qmap, (flat[:2],))
        head(flat)
    model.features, model.head = convert_fx(feats), convert_fx(head)
    return model


def quantize_run(run_dir: str | Path, out_dir: str | Path | None = None, *, calibration: str = "synthetic", rows: int = 512,
                 force: bool = False) -> QuantizeResult:
    """Quantize RUN_DIR's model.pt into OUT (default RUN_DIR/int8): model_int8.pt (TorchScript) and model.json (precision int8).

    PyTorch 2.13 marks torch.ao.quantization as deprecated in favour of the separate torchao package; its warnings
    are silenced here (the API still works and is what this build installs).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quantize(run_dir, out_dir, calibration, rows, force)


def _quantize(run_dir: str | Path, out_dir: str | Path | None, calibration: str, rows: int, force: bool) -> QuantizeResult:
    import torch

    try:
        predictor = Predictor(run_dir, tables_only=False)
    except PredictError as exc:
        raise QuantizeError(str(exc)) from None
    card, model = predictor.card, predictor.model
    if card.precision == "int8":
        raise QuantizeError(f"{run_dir}: its model is already INT8")
    _check_layers(model)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "int8"
    if out.exists() and any(out.iterdir()) and not force:
        raise QuantizeError(f"{out}: exists and is not empty (give another --out, or --force)")
    shape = tuple(int(d) for d in card.input_shape)
    convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if convs:
        calib, calib_text = _calibration_rows(predictor, calibration, rows, shape)
        qmodel, mode = _static(model, calib), "static"
    else:
        qmodel, mode, calib_text = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), "dynamic", \
            "none needed (dynamic: activations quantized per batch at run time)"
    example = torch.zeros((2, *shape), dtype=torch.float32)
    with torch.no_grad():
        scripted = torch.jit.trace(qmodel, example)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    fp32 = io.BytesIO()
    torch.save(torch.load(Path(run_dir) / "model.pt", weights_only=True), fp32)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / INT8_FILE, buf.getvalue())
    new_card = card.model_copy(update={"precision": "int8", "quantization": {
        "mode": mode, "engine": str(torch.backends.quantized.engine), "calibration": calib_text, "source_run": str(Path(run_dir).resolve()),
        "fp32_bytes": len(fp32.getvalue()), "int8_bytes": len(buf.getvalue())}})
    atomic_write_bytes(out / "model.json", new_card.model_dump_json(indent=2).encode())
    for extra in ("summary.json",):
        if (Path(run_dir) / extra).exists():
            shutil.copyfile(Path(run_dir) / extra, out / extra)
    return QuantizeResult(out, mode, len(fp32.getvalue()), len(buf.getvalue()), calib_text)
