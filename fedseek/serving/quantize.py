"""`fedseek quantize`: INT8 post-training quantization of a run's kept model, with PyTorch's own quantization tooling.

Linear layers (the tabular MLP, the CNN's head) use dynamic quantization when the model has no
convolutions: INT8 weights, activations quantized per batch at run time, no calibration data.
A CNN is quantized statically (FX graph mode on its convolutional block and its head: INT8
weights and activations), which needs calibration rows to fix the activation ranges. Where those
rows come from is explicit and recorded in the card: `synthetic` (inputs drawn at random, no
record of anyone), or a table the operator names (for example the coordinator's own test table,
held in the open; or a site's own records when the quantized model stays at that site, where
local use releases nothing). The quantized model is saved as its INT8 tensors in fedseek's own
small format (`model_int8.pt`, fedseek.serving.int8_file: a JSON index and raw bytes, no pickle,
no code) next to a copy of the card with `precision: int8`; `fedseek predict` and `fedseek serve`
rebuild the quantized architecture from the card, load the tensors and trace the module once
(TorchScript in memory, for speed; `load_int8`).
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.files import atomic_write_bytes
from fedseek.serving import int8_file
from fedseek.serving.predictor import PredictError, Predictor

INT8_FILE = "model_int8.pt"
UNPACKED_WEIGHT, UNPACKED_BIAS = ".unpacked_weight", ".unpacked_bias"
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
        what = "uniform [0, 1] pixels" if len(shape) >= 2 else "standard normal features"
        return _synthetic(rows, shape), f"synthetic ({what}; no record of anyone)"
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


def portable_state(qmodel: Any) -> dict[str, Any]:
    """The quantized model's state dict with FX's packed linear weights unpacked into INT8 tensors (weights_only-loadable)."""
    from collections import OrderedDict

    import torch

    state = qmodel.state_dict()
    out: OrderedDict[str, Any] = OrderedDict()
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # module versions: load_state_dict reads them
    for key, value in state.items():
        if isinstance(value, torch._C.ScriptObject):  # FX keeps a converted Linear's weight as a packed object
            weight, bias = torch.ops.quantized.linear_unpack(value)
            out[key + UNPACKED_WEIGHT] = weight
            out[key + UNPACKED_BIAS] = bias if bias is not None else torch.zeros(0)
        else:
            out[key] = value
    return out


def quantize_module(model: Any, shape: tuple[int, ...], calib: np.ndarray | None = None) -> tuple[Any, str, int]:
    """A quantized copy of `model` (the model itself is untouched), its mode and its saved size in bytes.

    Convolutions: static (FX) with `calib` rows (default: synthetic ones, see _calibration_rows); else dynamic.
    """
    import copy

    import torch

    _check_layers(model)
    model = copy.deepcopy(model).eval()
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        if calib is None:
            calib = _synthetic(512, shape)
        qmodel, mode = _static(model, calib), "static"
    else:
        qmodel, mode = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), "dynamic"
    return qmodel, mode, len(int8_file.dumps(portable_state(qmodel)))


def load_int8(card: Any, path: Path) -> Any:
    """Rebuild the quantized architecture the card describes and load `fedseek quantize`'s INT8 state into it."""
    import torch

    from fedseek.train.models import build_model

    mode = (card.quantization or {}).get("mode")
    if mode not in ("dynamic", "static"):
        raise ValueError(f"the card names no quantization mode (dynamic or static), got {mode!r}")
    state = int8_file.loads(Path(path).read_bytes())
    model = build_model(card.kind, tuple(card.input_shape), card.num_classes, card.hidden, seed=0, width=card.width).eval()
    if mode == "dynamic":
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    else:  # the structure only: every scale, zero point and weight comes from the file
        qmodel = _static(model, np.zeros((2, *card.input_shape), dtype=np.float32))
    packed = {k[: -len(UNPACKED_WEIGHT)] for k in state if k.endswith(UNPACKED_WEIGHT)}
    plain = type(state)((k, v) for k, v in state.items() if not k.endswith((UNPACKED_WEIGHT, UNPACKED_BIAS)))
    plain._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # module versions
    result = qmodel.load_state_dict(plain, strict=False)
    missing = set(result.missing_keys) - packed
    if missing or result.unexpected_keys:
        raise ValueError(f"the INT8 state does not fit the card's architecture (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]})")
    for key in packed:
        bias = state[key + UNPACKED_BIAS]
        module, _, attr = key.rpartition(".")
        setattr(qmodel.get_submodule(module), attr,
                torch.ops.quantized.linear_prepack(state[key + UNPACKED_WEIGHT], bias if bias.numel() else None))
    return traced(qmodel, tuple(card.input_shape))


def traced(qmodel: Any, shape: tuple[int, ...]) -> Any:
    """The quantized module traced to TorchScript in memory: eager quantized modules pay Python overhead per layer, which
    made the tabular MLP's INT8 form slower than fp32 (0.43x at batch 256); traced it is faster. Eager when tracing fails."""
    import torch

    qmodel.eval()
    try:
        with torch.no_grad():
            return torch.jit.trace(qmodel, torch.zeros((2, *shape), dtype=torch.float32))
    except Exception:  # noqa: BLE001 - tracing is an optimisation: the eager module gives the same answers
        return qmodel


def _synthetic(rows: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if len(shape) >= 2:  # images: pixel intensities in [0, 1] as every fedseek image loader gives them
        return rng.uniform(0.0, 1.0, (rows, *shape)).astype(np.float32)
    return rng.normal(0.0, 1.0, (rows, *shape)).astype(np.float32)


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
    """Quantize RUN_DIR's model.pt into OUT (default RUN_DIR/int8): model_int8.pt (INT8 state dict) and model.json (precision int8).

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
    calib, calib_text = _calibration_rows(predictor, calibration, rows, shape) if convs else (None, "")
    qmodel, mode, _ = quantize_module(model, shape, calib)
    if mode == "dynamic":
        calib_text = "none needed (dynamic: activations quantized per batch at run time)"
    data = int8_file.dumps(portable_state(qmodel))
    fp32 = io.BytesIO()
    torch.save(torch.load(Path(run_dir) / "model.pt", weights_only=True), fp32)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / INT8_FILE, data)
    new_card = card.model_copy(update={"precision": "int8", "quantization": {
        "mode": mode, "engine": str(torch.backends.quantized.engine), "calibration": calib_text, "source_run": str(Path(run_dir).resolve()),
        "fp32_bytes": len(fp32.getvalue()), "int8_bytes": len(data)}})
    atomic_write_bytes(out / "model.json", new_card.model_dump_json(indent=2).encode())
    for extra in ("summary.json",):
        if (Path(run_dir) / extra).exists():
            shutil.copyfile(Path(run_dir) / extra, out / extra)
    return QuantizeResult(out, mode, len(fp32.getvalue()), len(data), calib_text)
