"""`fedseek quantize`: INT8 post-training quantization (dynamic for the MLP, static with calibration for the CNN).

The quantized model must answer like the fp32 one on >= 98% of rows, load in `fedseek predict`
(and so in `fedseek serve`, which shares the predictor), and every bad input is one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseek.outputs.model_card import ModelCard, Preprocessing
from fedseek.serving.predictor import Predictor
from fedseek.train.local import predict_scores, train_local
from fedseek.train.models import build_model
from tests.test_serve import FEATURES, _rows, _run_dir


def _quantize(capsys, *args: str) -> tuple[int, str, str]:
    from fedseek.ops.cli import main

    capsys.readouterr()
    code = main(["quantize", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_mlp_is_quantized_dynamically_and_answers_like_fp32(tmp_path, capsys):
    run = _run_dir(tmp_path / "run", key=False)
    code, out, err = _quantize(capsys, str(run), "--out", str(tmp_path / "int8"))
    assert code == 0, err
    assert "INT8 (dynamic)" in out and "none needed" in out
    card = json.loads((tmp_path / "int8" / "model.json").read_text())
    assert card["precision"] == "int8" and card["quantization"]["mode"] == "dynamic" and card["features"] == FEATURES
    rows = _rows(400, seed=4)
    fp32, int8 = Predictor(run).predict(rows), Predictor(tmp_path / "int8").predict(rows)
    assert int8.probs is not None and fp32.probs is not None
    assert np.mean([a == b for a, b in zip(fp32.labels, int8.labels, strict=True)]) >= 0.98
    assert np.abs(int8.probs - fp32.probs).max() < 0.05
    from fedseek.ops.predict import predict_table

    rows.to_csv(tmp_path / "in.csv", index=False)
    assert predict_table(tmp_path / "int8", tmp_path / "in.csv", tmp_path / "pred.csv") == 400


def test_the_cnn_is_quantized_statically_with_synthetic_calibration(tmp_path, capsys):
    from fedseek.data import load_builtin

    train, test = load_builtin("digits", 0, test_fraction=0.25)
    model = build_model("cnn", train.input_shape, 10, seed=0)
    train_local(model, train.x, train.y, num_classes=10, epochs=3, lr=0.05, batch_size=32, momentum=0.9)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    card = ModelCard(kind="cnn", input_shape=list(train.input_shape), num_classes=10, preprocessing=Preprocessing(scaling="builtin"))
    (run / "model.json").write_text(card.model_dump_json())
    code, out, err = _quantize(capsys, str(run), "--rows", "256")
    assert code == 0, err
    assert "INT8 (static)" in out and "synthetic" in out
    q = Predictor(run / "int8", tables_only=False).model
    fp32 = predict_scores(model, test.x).argmax(1)
    int8 = predict_scores(q, test.x).argmax(1)
    print(f"digits CNN: fp32 {np.mean(fp32 == test.y):.4f}, int8 {np.mean(int8 == test.y):.4f}, agreement {np.mean(fp32 == int8):.4f}")
    assert np.mean(fp32 == int8) >= 0.98
    assert json.loads((run / "int8" / "model.json").read_text())["quantization"]["calibration"].startswith("synthetic")
    # fedseek's own packing (no pickle): the 10k-weight CNN's file is >= 3.5x smaller than its model.pt
    data = (run / "int8" / "model_int8.pt").read_bytes()
    assert data.startswith(b"FSQ8") and (run / "model.pt").stat().st_size >= 3.5 * len(data)


def test_the_int8_file_round_trips_exactly_and_a_damaged_one_is_one_line(tmp_path):
    from fedseek.serving import int8_file
    from fedseek.serving.predictor import PredictError
    from fedseek.serving.quantize import portable_state, quantize_module

    for model, shape in ((build_model("mlp", (30,), 2, [64], seed=0), (30,)), (build_model("cnn", (1, 8, 8), 3, seed=0), (1, 8, 8))):
        q, _, nbytes = quantize_module(model, shape, np.random.default_rng(0).uniform(0, 1, (64, *shape)).astype(np.float32))
        state = portable_state(q)
        back = int8_file.loads(int8_file.dumps(state))
        assert list(back) == list(state) and nbytes == len(int8_file.dumps(state))
        for key, value in state.items():
            got = back[key]
            if isinstance(value, torch.Tensor) and value.is_quantized:
                assert torch.equal(value.int_repr(), got.int_repr()) and value.qscheme() == got.qscheme(), key
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, got) and value.shape == got.shape, key
    run = _run_dir(tmp_path / "run", key=False)
    from fedseek.serving.quantize import quantize_run

    quantize_run(run, tmp_path / "q")
    path = tmp_path / "q" / "model_int8.pt"
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with pytest.raises(PredictError, match="cannot load the INT8 model") as err:
        Predictor(tmp_path / "q")
    assert "\n" not in str(err.value)
    path.write_bytes(b"PK\x03\x04 a zip, or a pickle: never unpickled")
    with pytest.raises(PredictError, match="not a fedseek INT8 model file"):
        Predictor(tmp_path / "q")


@pytest.mark.parametrize(("case", "message"), [
    ("no_model", "model.pt: not found"),
    ("already_int8", "already INT8"),
    ("busy_out", "exists and is not empty"),
    ("bad_calibration", "nope.csv: file not found"),
])
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, case, message):
    run = _run_dir(tmp_path / "run", key=False)
    args = [str(run)]
    if case == "no_model":
        (run / "model.pt").unlink()
    if case == "already_int8":
        assert _quantize(capsys, str(run), "--out", str(tmp_path / "q"))[0] == 0
        args = [str(tmp_path / "q")]
    if case == "busy_out":
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("x")
        args += ["--out", str(tmp_path / "busy")]
    if case == "bad_calibration":
        model = build_model("cnn", (1, 8, 8), 3, seed=0)
        torch.save(model.state_dict(), run / "model.pt")
        card = ModelCard(kind="cnn", input_shape=[1, 8, 8], num_classes=3, preprocessing=Preprocessing(scaling="builtin"))
        (run / "model.json").write_text(card.model_dump_json())
        args += ["--calibration", str(tmp_path / "nope.csv")]
    code, _, err = _quantize(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(" ") and "Warning" not in ln]
    assert code == 2 and any(message in ln for ln in lines), err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1


def test_layers_without_an_int8_kernel_are_refused():
    from fedseek.serving.quantize import QuantizeError, _check_layers

    with pytest.raises(QuantizeError, match=r"layers \['BatchNorm1d'\] are not supported"):
        _check_layers(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    _check_layers(build_model("cnn", (1, 8, 8), 3))  # every layer of fedseek's models is supported


def test_a_path_that_is_not_a_run_directory_is_refused(tmp_path, capsys):
    code, _, err = _quantize(capsys, str(Path(tmp_path) / "missing"))
    assert code == 2 and "model.json: not found" in err
