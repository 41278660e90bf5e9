"""`fedseek serve`'s HTTP service (FastAPI on uvicorn): POST /predict, GET /health, GET /metrics.

Rows come as JSON (`{"rows": [{column: value, ...}, ...]}` or a bare list of such objects) or
as CSV (`Content-Type: text/csv`, a header line naming the columns). Every problem with a
request is a 4xx with `{"error": "<one line>"}`: 400 unreadable body, 413 too large or too many
rows, 415 another content type, 422 rows that do not fit the model (a missing column, a value
outside a vocabulary, a missing value). Anything unexpected is a 500 with a fixed message; the
traceback goes to the server's log only. With an output watermark, low-margin answers are
marked (fedseek.watermark.outputs) and the marked queries appended to the mark log.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fedseek.serving.predictor import PredictError, Predictor
from fedseek.watermark.mark_log import MarkLog
from fedseek.watermark.outputs import mark

log = logging.getLogger("fedseek.serve")
JSON_TYPES = ("application/json", "")
CSV_TYPES = ("text/csv", "application/csv")


class RequestError(ValueError):
    """A bad request: the HTTP status and one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class OutputMark:
    """The output watermark a server applies: its subkey, margin and log of marked queries."""

    subkey: bytes
    margin: float
    log: MarkLog


@dataclass(frozen=True)
class Limits:
    """Request bounds: body size and rows per request."""

    max_bytes: int = 1 << 20
    max_rows: int = 10_000


class ServeMetrics:
    """The service's Prometheus series, in a registry of its own (requests, latency, errors, rows, marked answers)."""

    def __init__(self, run: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels = ["run", "endpoint", "code"]
        self.requests = Counter("fedseek_serve_requests", "HTTP requests answered", labels, registry=self.registry)
        self.errors = Counter("fedseek_serve_errors", "requests answered with a 4xx or 5xx", labels, registry=self.registry)
        self.latency = Histogram("fedseek_serve_request_seconds", "time to answer a request", ["run", "endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=self.registry)
        self.rows = Counter("fedseek_serve_rows", "rows answered", ["run"], registry=self.registry)
        self.marked = Counter("fedseek_serve_marked_answers", "answers carrying the output watermark", ["run"], registry=self.registry)
        self.run = run

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(self.run, endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(self.run, endpoint, str(code)).inc()
        self.latency.labels(self.run, endpoint).observe(seconds)


def parse_rows(body: bytes, content_type: str, limits: Limits) -> Any:
    """The request's rows as a DataFrame (RequestError with the status and one line otherwise)."""
    import pandas as pd

    kind = content_type.split(";")[0].strip().lower()
    if kind in CSV_TYPES:
        try:
            df = pd.read_csv(io.BytesIO(body))
        except Exception as exc:  # noqa: BLE001 - any CSV parser failure is a bad request
            raise RequestError(400, f"body is not a readable CSV table ({str(exc).splitlines()[0][:150]})") from None
    elif kind in JSON_TYPES:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise RequestError(400, 'body is not JSON (send {"rows": [{column: value}, ...]} or CSV as text/csv)') from None
        rows = doc.get("rows") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RequestError(400, "JSON body must be {\"rows\": [{column: value, ...}, ...]} or a list of such objects")
        bad = next((r for r in rows for v in r.values() if isinstance(v, (dict, list))), None)
        if bad is not None:
            raise RequestError(400, "each row maps column names to single values (numbers, text, booleans or null)")
        df = pd.DataFrame(rows)
    else:
        raise RequestError(415, f"content type {kind!r} not supported (use application/json or text/csv)")
    if len(df) == 0:
        raise RequestError(422, "no rows in the request")
    if len(df) > limits.max_rows:
        raise RequestError(413, f"{len(df)} rows in one request; at most {limits.max_rows}")
    df.columns = [str(c) for c in df.columns]
    return df


def answer(predictor: Predictor, df: Any, marker: OutputMark | None, labels_only: bool = False) -> tuple[dict[str, Any], int]:
    """The JSON answer for a batch of rows (labels without probabilities with `labels_only`), and how many carry the watermark."""
    x = predictor.features(df, "request")
    pred = predictor.predict_features(x)
    if pred.probs is None or pred.classes is None:
        return {"task": "regression", "predictions": [{"value": v} for v in pred.labels]}, 0
    probs, labels, n_marked = pred.probs, [pred.classes.index(lbl) for lbl in pred.labels], 0
    if marker is not None:
        rows = df[predictor.columns].to_numpy(dtype=object).tolist()
        marked = mark(probs, x, marker.subkey, marker.margin, marker.log.spec)
        probs, labels = marked.probs, [int(k) for k in marked.labels]
        idx = [int(i) for i in marked.marked.nonzero()[0]]
        marker.log.append([rows[i] for i in idx], [pred.classes[labels[i]] for i in idx], [pred.classes[int(marked.other[i])] for i in idx],
                          [marked.units[i] for i in idx])
        n_marked = len(idx)
    classes = pred.classes
    out: list[dict[str, Any]] = [{"label": classes[k]} if labels_only else
                                 {"label": classes[k], "probabilities": {c: float(p) for c, p in zip(classes, row, strict=True)}}
                                 for k, row in zip(labels, probs, strict=True)]
    return {"task": "classification", "classes": classes, "predictions": out}, n_marked


def build_app(predictor: Predictor, *, run: str, marker: OutputMark | None = None, limits: Limits | None = None,
              labels_only: bool = False) -> FastAPI:
    """The service for one model (`labels_only`: answers carry no probabilities)."""
    limits = limits or Limits()
    metrics = ServeMetrics(run)
    app = FastAPI(title=f"fedseek model {run}", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        code = 200
        body: dict[str, Any] = {}
        try:
            raw = await _body(request, limits)
            df = parse_rows(raw, request.headers.get("content-type", ""), limits)
            body, n_marked = answer(predictor, df, marker, labels_only)
            metrics.rows.labels(run).inc(len(df))
            if n_marked:
                metrics.marked.labels(run).inc(n_marked)
        except RequestError as exc:
            code, body = exc.status, {"error": str(exc)}
        except PredictError as exc:
            code, body = 422, {"error": " ".join(str(exc).split())}
        except Exception:  # noqa: BLE001 - the client gets a fixed line; the traceback stays in the server log
            log.exception("predict failed")
            code, body = 500, {"error": "internal error (see the server log)"}
        metrics.observe("/predict", code, time.perf_counter() - t0)
        return JSONResponse(body, status_code=code)

    @app.get("/health")
    async def health() -> Response:
        t0 = time.perf_counter()
        card = predictor.card
        body = {"status": "ok", "run": run, "task": card.task, "features": predictor.columns, "classes": predictor.classes or None,
                "int8": predictor.int8, "output_watermark": marker is not None, "probabilities": not labels_only}
        metrics.observe("/health", 200, time.perf_counter() - t0)
        return JSONResponse(body)

    @app.get("/metrics")
    async def scrape() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _body(request: Request, limits: Limits) -> bytes:
    """The request body, refused with 413 as soon as it passes the size limit (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise RequestError(413, f"body of {int(declared)} bytes; at most {limits.max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_bytes:
            raise RequestError(413, f"body larger than {limits.max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
