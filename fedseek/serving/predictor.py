"""A run's kept model with the preprocessing its card names: table rows in, classes and probabilities (or values) out.

Shared by `fedseek predict` (a file) and `fedseek serve` (HTTP), so a row gets the same answer
both ways. `int8` loads the model with PyTorch's dynamic INT8 quantization of its linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseek.data import DataError
from fedseek.outputs.model_card import CardError, ModelCard, card_spec, read_card


class PredictError(ValueError):
    """The model or the input cannot be used (one line; the CLI exits 2, the server answers 4xx)."""


@dataclass(frozen=True)
class Prediction:
    """Answers for a batch: class names (or values for a regression) and class probabilities (None for a regression)."""

    labels: list[Any]
    probs: np.ndarray | None
    classes: list[str] | None


def _load_model(run_dir: Path, card: ModelCard, int8: bool) -> Any:
    import torch

    from fedseek.train.models import build_model

    if card.precision == "int8":  # `fedseek quantize` output: an INT8 state dict for the architecture the card names
        import warnings

        from fedseek.serving.quantize import INT8_FILE, load_int8

        path = run_dir / INT8_FILE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (see serving.quantize)
                return load_int8(card, path)
        except Exception as exc:  # noqa: BLE001 - a missing or damaged file
            raise PredictError(f"{path}: cannot load the INT8 model ({str(exc).splitlines()[0][:200]})") from None
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise PredictError(f"{weights}: not found (a finished run directory holds model.pt)")
    model = build_model(card.kind, tuple(card.input_shape), card.num_classes, card.hidden, seed=0, width=card.width)
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a truncated file or another architecture
        raise PredictError(f"{weights}: does not load into the model its card describes ({str(exc).splitlines()[0][:200]})") from None
    model.eval()
    if int8:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (see serving.quantize)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


class Predictor:
    """A run directory's model.pt and model.json, ready to answer table rows."""

    def __init__(self, run_dir: str | Path, *, int8: bool = False, tables_only: bool = True) -> None:
        """Read the card and the weights; PredictError (one line) when either is missing or unusable.

        `tables_only` (the default) refuses a model whose card cannot turn table rows into features.
        """
        self.run_dir = Path(run_dir)
        try:
            self.card = read_card(self.run_dir / "model.json")
        except CardError as exc:
            raise PredictError(str(exc)) from None
        pre = self.card.preprocessing
        self.int8 = int8 or self.card.precision == "int8"
        if not tables_only:
            self.columns: list[str] = list(pre.columns or [])
            self.model = _load_model(self.run_dir, self.card, int8)
            return
        if self.card.features is None or pre.columns is None:
            raise PredictError(f"{self.run_dir / 'model.json'}: the card names no table columns (the model was not trained on "
                               "tables), so a table cannot be matched to it")
        if pre.scaling in ("builtin", "unknown"):
            raise PredictError(f"{self.run_dir / 'model.json'}: preprocessing '{pre.scaling}' ({pre.description}): "
                               "a table's rows cannot be prepared the same way")
        self.columns = list(pre.columns)
        self.model = _load_model(self.run_dir, self.card, int8)

    @property
    def regression(self) -> bool:
        """True for a model that predicts a number."""
        return self.card.task == "regression"

    @property
    def classes(self) -> list[str]:
        """Class names in output order (empty for a regression)."""
        if self.regression:
            return []
        return self.card.classes or [str(k) for k in range(self.card.num_classes)]

    def features(self, df: Any, source: str = "input") -> np.ndarray:
        """The model's feature matrix for a table's rows (PredictError naming the problem)."""
        from fedseek.data.preprocess import prepare_features

        if len(df) == 0:
            raise PredictError(f"{source}: no rows")
        if self.card.preprocessing.scaling == "local" and len(df) < 2:
            raise PredictError(f"{source}: one row: this model scales each table by its own statistics, so it needs a batch "
                               "of rows (at least 2)")
        try:
            x, names = prepare_features(source, df, self.columns, card_spec(self.card))
        except DataError as exc:
            raise PredictError(str(exc)) from None
        expected = list(self.card.features or [])
        if names != expected:
            raise PredictError(f"{source}: its rows give the features {names[:8]}, the model expects {expected[:8]}")
        return x.astype(np.float32)

    def predict(self, df: Any, source: str = "input") -> Prediction:
        """Answers for every row of `df` (a pandas DataFrame with at least the card's columns)."""
        return self.predict_features(self.features(df, source))

    def predict_features(self, x: np.ndarray) -> Prediction:
        """Answers for the model's feature rows (as `features` gives them)."""
        from fedseek.train.local import predict_scores, predict_values

        if self.regression:
            values = predict_values(self.model, x)
            if self.card.target_scale is not None:
                values = values * self.card.target_scale[1] + self.card.target_scale[0]
            return Prediction(labels=[float(v) for v in values], probs=None, classes=None)
        scores = predict_scores(self.model, x)
        classes = self.classes
        return Prediction(labels=[classes[k] for k in scores.argmax(1)], probs=scores, classes=classes)
