"""`fedseek predict`: apply a run's model to a table, with the preprocessing its model card names.

Reads RUN_DIR/model.json (the card: features in order, classes, scaling) and RUN_DIR/model.pt,
reads the input table with the site loader's checks (missing, non-numeric, infinite values are
one-line errors), scales it as the card says, and writes every input row with the predicted class
and one probability column per class (regression: the predicted value, in the target's own units).
"""

from __future__ import annotations

import io
from pathlib import Path

from fedseek.data import DataError
from fedseek.files import atomic_write_bytes
from fedseek.serving.predictor import PredictError, Predictor

__all__ = ["PredictError", "predict_table"]


def predict_table(run_dir: str | Path, input_path: str | Path, out_path: str | Path) -> int:
    """Write OUT with the input's rows, `predicted` and `prob_<class>` columns; the number of rows. PredictError otherwise."""
    from fedseek.data.loaders import read_table

    predictor = Predictor(run_dir)
    try:
        df = read_table(input_path)
    except DataError as exc:
        raise PredictError(str(exc)) from None
    if len(df) == 0:
        raise PredictError(f"{input_path}: empty table (no rows)")
    pred = predictor.predict(df, str(input_path))
    out = df.copy()
    out["predicted"] = pred.labels
    if pred.probs is not None and pred.classes is not None:
        for k, name in enumerate(pred.classes):
            out[f"prob_{name}"] = pred.probs[:, k]
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_bytes(Path(out_path), buf.getvalue().encode())
    return len(out)
