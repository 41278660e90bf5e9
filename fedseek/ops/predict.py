"""`fedseek predict`: apply a run's model to a table, with the preprocessing its model card names.

Reads RUN_DIR/model.json (the card: features in order, classes, scaling) and RUN_DIR/model.pt,
reads the input table with the site loader's checks (missing, non-numeric, infinite values are
one-line errors), scales it as the card says, and writes every input row with the predicted class
and one probability column per class (regression: the predicted value, in the target's own units).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fedseek.data import DataError
from fedseek.files import atomic_write_bytes
from fedseek.outputs.model_card import CardError, ModelCard, card_spec, read_card


class PredictError(ValueError):
    """The model or the input cannot be used (one line; the CLI exits 2)."""


def _load_model(run_dir: Path, card: ModelCard) -> object:
    import torch

    from fedseek.train.models import build_model

    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise PredictError(f"{weights}: not found (a finished run directory holds model.pt)")
    model = build_model(card.kind, tuple(card.input_shape), card.num_classes, card.hidden, seed=0)
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a truncated file or another architecture
        raise PredictError(f"{weights}: does not load into the model its card describes ({str(exc).splitlines()[0][:200]})") from None
    return model


def predict_table(run_dir: str | Path, input_path: str | Path, out_path: str | Path) -> int:
    """Write OUT with the input's rows, `predicted` and `prob_<class>` columns; the number of rows. PredictError otherwise."""
    from fedseek.data.loaders import read_table
    from fedseek.data.preprocess import prepare_features
    from fedseek.train.local import predict_scores, predict_values

    run_dir = Path(run_dir)
    try:
        card = read_card(run_dir / "model.json")
    except CardError as exc:
        raise PredictError(str(exc)) from None
    pre = card.preprocessing
    if card.features is None or pre.columns is None:
        raise PredictError(f"{run_dir / 'model.json'}: the card names no table columns (the model was not trained on tables), "
                           "so a table cannot be matched to it")
    if pre.scaling in ("builtin", "unknown"):
        raise PredictError(f"{run_dir / 'model.json'}: preprocessing '{pre.scaling}' ({pre.description}): "
                           "a table's rows cannot be prepared the same way")
    model = _load_model(run_dir, card)
    try:
        df = read_table(input_path)
        if len(df) == 0:
            raise DataError(f"{input_path}: empty table (no rows)")
        if pre.scaling == "local" and len(df) < 2:
            raise DataError(f"{input_path}: one row: this model scales each table by its own statistics, so predict needs "
                            "a batch of rows (at least 2)")
        x, names = prepare_features(input_path, df, list(pre.columns), card_spec(card))
    except DataError as exc:
        raise PredictError(str(exc)) from None
    if names != card.features:
        raise PredictError(f"{input_path}: its rows give the features {names[:8]}, the model expects {card.features[:8]}")
    out = df.copy()
    if card.task == "regression":
        values = predict_values(model, x.astype(np.float32))  # type: ignore[arg-type]
        if card.target_scale is not None:
            values = values * card.target_scale[1] + card.target_scale[0]
        out["predicted"] = values
    else:
        scores = predict_scores(model, x.astype(np.float32))  # type: ignore[arg-type]
        classes = card.classes or [str(k) for k in range(card.num_classes)]
        out["predicted"] = [classes[k] for k in scores.argmax(1)]
        for k, name in enumerate(classes):
            out[f"prob_{name}"] = scores[:, k]
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_bytes(Path(out_path), buf.getvalue().encode())
    return len(out)
