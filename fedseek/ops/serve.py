"""`fedseek serve` and `fedseek watermark verify-outputs`: run the HTTP service for a run's model, test a suspect.

The server binds 127.0.0.1 unless told otherwise; `--tls-cert/--tls-key` (for example the
federation's coordinator certificate and key from `fedseek certs init`) make it HTTPS. With a
watermark key (the run's own `watermark.key`, or `--watermark-key`), low-margin answers carry
the output watermark and every marked query is appended to the mark log (default
RUN_DIR/served_marks.jsonl), which `verify-outputs` needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseek.serving.predictor import PredictError, Predictor
from fedseek.watermark.mark_log import MarkLog, MarkLogError, log_header, read_log
from fedseek.watermark.output_verdict import OutputVerdict, verdict
from fedseek.watermark.outputs import DEFAULT_CELL_WIDTH, DEFAULT_MARGIN, SCHEME_V1, CellSpec, output_subkey


class ServeError(ValueError):
    """A setting that keeps the server from starting (one line; exit 2)."""


@dataclass
class ServeOptions:
    """What `fedseek serve` was asked for."""

    run_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    int8: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    watermark_key: str | None = None
    margin: float = DEFAULT_MARGIN
    cell_width: float = DEFAULT_CELL_WIDTH
    mark_log: str | None = None
    no_watermark: bool = False
    labels_only: bool = False
    max_rows: int = 10_000
    max_body_mb: float = 1.0


def _subkey(path: str | Path) -> bytes:
    from fedseek import watermark as wm

    try:
        return output_subkey(wm.load_key(path).seed_hex)
    except (OSError, ValueError) as exc:
        raise ServeError(f"{path}: not a usable watermark key ({exc})") from None


DEFAULT_LOG = "served_marks.jsonl"
DEFAULT_LOG_V2 = "served_marks.v2.jsonl"  # where an upgraded server logs when RUN_DIR/served_marks.jsonl is a v1 log


def build_service(opts: ServeOptions) -> tuple[Any, str]:
    """The FastAPI app for the run and a line describing its output watermark; ServeError/PredictError when unusable."""
    from fedseek.serving.app import Limits, OutputMark, build_app

    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ServeError("give both --tls-cert and --tls-key (or neither)")
    for f in (opts.tls_cert, opts.tls_key):
        if f is not None and not Path(f).is_file():
            raise ServeError(f"{f}: not found")
    if not 0.0 <= opts.margin <= 1.0:
        raise ServeError(f"--watermark-margin {opts.margin}: must be in [0, 1]")
    if not (math.isfinite(opts.cell_width) and opts.cell_width > 0):
        raise ServeError(f"--watermark-cell-width {opts.cell_width}: must be > 0")
    predictor = Predictor(opts.run_dir, int8=opts.int8)
    run = Path(opts.run_dir).resolve().name
    key = opts.watermark_key or (str(Path(opts.run_dir) / "watermark.key") if (Path(opts.run_dir) / "watermark.key").exists() else None)
    marker, how = None, "off (no watermark key: answers are not marked)"
    if opts.no_watermark:
        how = "off (--no-watermark)"
    elif key is not None and predictor.regression:
        how = "off (a regression's answers are numbers: the output watermark marks class answers)"
    elif key is not None:
        subkey = _subkey(key)
        log_path, note = opts.mark_log or str(Path(opts.run_dir) / DEFAULT_LOG), ""
        head = log_header(Path(log_path)) if opts.mark_log is None else None
        if head is not None and head[0] == SCHEME_V1:  # an upgraded server keeps its old log as it is
            log_path, note = str(Path(opts.run_dir) / DEFAULT_LOG_V2), f"; {DEFAULT_LOG} is an earlier scheme's log, kept as it is"
        try:
            mark_log = MarkLog(log_path, predictor.columns, subkey, CellSpec(width=opts.cell_width))
        except (MarkLogError, OSError) as exc:
            raise ServeError(str(exc)) from None
        marker = OutputMark(subkey=subkey, margin=opts.margin, log=mark_log)
        how = f"on (key {key}, margin {opts.margin:g}, cell width {opts.cell_width:g}; marked queries logged to {log_path}{note})"
    app = build_app(predictor, run=run, marker=marker, limits=Limits(max_bytes=int(opts.max_body_mb * (1 << 20)), max_rows=opts.max_rows),
                    labels_only=opts.labels_only)
    return app, how


def serve(opts: ServeOptions) -> None:
    """Run the service until interrupted (uvicorn)."""
    import uvicorn

    app, how = build_service(opts)
    scheme = "https" if opts.tls_cert else "http"
    print(f"serving {opts.run_dir} at {scheme}://{opts.host}:{opts.port}  (POST /predict, GET /health, GET /metrics)", flush=True)
    print(f"output watermark: {how}", flush=True)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.tls_cert:
        print(f"warning: listening on {opts.host} without TLS: anyone on the network can query the model", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key, log_level="warning")


def calibrate_margin(run_dir: str, table: str, label_column: str, cost_points: float) -> Any:
    """The watermark margin whose expected accuracy cost on a labelled table stays within `cost_points` (a MarginChoice)."""
    import numpy as np

    from fedseek.data import DataError
    from fedseek.data.loaders import read_table
    from fedseek.watermark.outputs import margin_for_cost

    predictor = Predictor(run_dir)
    if predictor.regression:
        raise ServeError(f"{run_dir}: a regression's answers are numbers: the output watermark marks class answers")
    try:
        df = read_table(table)
    except DataError as exc:
        raise ServeError(str(exc)) from None
    if label_column not in df.columns:
        raise ServeError(f"{table}: label column {label_column!r} not found")
    pred = predictor.predict(df, table)
    lookup = {c: i for i, c in enumerate(predictor.classes)}
    labels = [lookup.get(str(v), -1) for v in df[label_column]]
    unknown = sum(1 for v in labels if v < 0)
    if unknown:
        raise ServeError(f"{table}: {unknown} labels are not among the model's classes {predictor.classes[:10]}")
    assert pred.probs is not None
    return margin_for_cost(pred.probs, np.asarray(labels), cost_points)


@dataclass(frozen=True)
class SuspectAnswers:
    """A suspect's answers on the logged rows: labels, and class probabilities when it gives them."""

    labels: list[Any]
    probs: list[dict[str, float]] | None


def suspect_answers_from_model(run_dir: str, columns: list[str], rows: list[list[Any]]) -> SuspectAnswers:
    """A suspect run directory's answers on the logged rows (its own card's preprocessing), with its probabilities."""
    import pandas as pd

    pred = Predictor(run_dir).predict(pd.DataFrame(rows, columns=columns), "mark log")
    probs = None
    if pred.probs is not None and pred.classes is not None:
        probs = [dict(zip(pred.classes, map(float, row), strict=True)) for row in pred.probs]
    return SuspectAnswers(list(pred.labels), probs)


def suspect_answers_from_url(url: str, columns: list[str], rows: list[list[Any]], *, timeout_s: float = 30.0,
                             verify: str | bool = True, batch: int = 500) -> SuspectAnswers:
    """A suspect endpoint's answers on the logged rows (POST {"rows": [...]} to URL, or URL/predict); its probabilities
    are used when every answer carries them ({"label", "probabilities": {class: p}}, as fedseek serves)."""
    import httpx

    target = url if url.rstrip("/").endswith("/predict") else url.rstrip("/") + "/predict"
    labels: list[Any] = []
    probs: list[dict[str, float]] | None = []
    with httpx.Client(timeout=timeout_s, verify=verify) as client:
        for i in range(0, len(rows), batch):
            body = {"rows": [dict(zip(columns, r, strict=True)) for r in rows[i : i + batch]]}
            try:
                resp = client.post(target, json=body)
            except httpx.HTTPError as exc:
                raise ServeError(f"{target}: {type(exc).__name__}: {exc}") from None
            if resp.status_code != 200:
                raise ServeError(f"{target}: HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                answers = resp.json()["predictions"]
                labels += [p["label"] for p in answers]
            except (ValueError, KeyError, TypeError):
                raise ServeError(f"{target}: the answer is not a fedseek-style prediction list") from None
            if probs is not None:
                try:
                    probs += [{str(k): float(v) for k, v in p["probabilities"].items()} for p in answers]
                except (KeyError, TypeError, ValueError, AttributeError):
                    probs = None  # labels only: the sign test decides
    return SuspectAnswers(labels, probs)


def verify_outputs(key: str, log: str, *, model: str | None = None, url: str | None = None, alpha: float = 1e-6,
                   verify_tls: str | bool = True, labels_only: bool = False) -> OutputVerdict:
    """Query the suspect (a run directory or an endpoint) on the logged marked rows; the exact verdict over units
    (the score test when the suspect gives probabilities and `labels_only` is off, else the sign test)."""
    if (model is None) == (url is None):
        raise ServeError("give exactly one of --model (a run directory) and --url (an endpoint)")
    logged = read_log(log, _subkey(key))
    if not logged.rows:
        raise ServeError(f"{log}: no marked queries logged yet (nothing to test)")
    try:
        answers = (suspect_answers_from_model(model, logged.columns, logged.rows) if model is not None
                   else suspect_answers_from_url(str(url), logged.columns, logged.rows, verify=verify_tls))
    except PredictError as exc:
        raise ServeError(str(exc)) from None
    if len(answers.labels) != len(logged.served) or (answers.probs is not None and len(answers.probs) != len(logged.served)):
        raise ServeError(f"the suspect answered {len(answers.labels)} of {len(logged.served)} rows")
    res = verdict(answers.labels, logged.served, logged.other, logged.units, alpha, suspect_probs=None if labels_only else answers.probs)
    return dataclasses.replace(res, scheme=logged.scheme)
