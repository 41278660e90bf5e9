"""`fedseek serve RUN_DIR`, `fedseek quantize RUN_DIR` and `fedseek watermark verify-outputs`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer


def serve(
    run_dir: Annotated[str, typer.Argument(help="A finished run's directory (model.pt + model.json).")],
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    int8: Annotated[bool, typer.Option("--int8", help="Dynamic INT8 quantization of the linear layers.")] = False,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="... and this private key (PEM).")] = None,
    watermark_key: Annotated[str | None, typer.Option("--watermark-key", help="Output watermark key; default RUN_DIR/watermark.key if "
                                                                              "the run has one.")] = None,
    margin: Annotated[float, typer.Option("--watermark-margin", help="Mark answers whose top-two probabilities differ by at most "
                                                                     "this.")] = 0.15,
    cell_width: Annotated[float, typer.Option("--watermark-cell-width", help="Width of the watermark's keyed cells, in units of "
                                                                             "the model's scaled features (near-duplicate queries "
                                                                             "share a cell and its keyed answer).")] = 0.7,
    mark_log: Annotated[str | None, typer.Option("--mark-log", help="Log of marked queries; default RUN_DIR/served_marks.jsonl.")] = None,
    no_watermark: Annotated[bool, typer.Option("--no-watermark", help="Serve unmarked answers even if a key exists.")] = False,
    labels_only: Annotated[bool, typer.Option("--labels-only", help="Answer with class labels only, no probabilities (the output "
                                                                    "watermark's marked answers then look like any other).")] = False,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows per request.")] = 10_000,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body.")] = 1.0,
) -> int:
    """Serve a run's model over HTTP: POST /predict (JSON or CSV rows), GET /health, GET /metrics."""
    from fedseek.ops.serve import ServeError, ServeOptions
    from fedseek.ops.serve import serve as run_server
    from fedseek.serving.predictor import PredictError

    opts = ServeOptions(run_dir=run_dir, host=host, port=port, int8=int8, tls_cert=tls_cert, tls_key=tls_key,
                        watermark_key=watermark_key, margin=margin, cell_width=cell_width, mark_log=mark_log, no_watermark=no_watermark,
                        labels_only=labels_only, max_rows=max_rows, max_body_mb=max_body_mb)
    try:
        run_server(opts)
    except (ServeError, PredictError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def verify_outputs(
    key: Annotated[str, typer.Option("--key", help="The secret watermark key the server used.")],
    log: Annotated[str, typer.Option("--log", help="The server's mark log (served_marks.jsonl).")],
    model: Annotated[str | None, typer.Option("--model", help="A suspect run directory (model.pt + model.json).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="A suspect prediction endpoint (fedseek-style JSON).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 1e-6,
    labels_only: Annotated[bool, typer.Option("--labels-only", help="Use the suspect's labels only (the sign test), even when it "
                                                                    "gives probabilities.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Test a suspect model or endpoint, black-box, for the output watermark (exact tests over the log's units)."""
    from fedseek.ops.serve import ServeError
    from fedseek.ops.serve import verify_outputs as run_verify

    try:
        res = run_verify(key, log, model=model, url=url, alpha=alpha, labels_only=labels_only)
    except (ServeError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(f"{res.logged} marked queries logged in {res.units} units (cell and class pair); the suspect's majority answer is "
              f"the served class in {res.matches} of the {res.n} units where it has one (an independent model: 1/2 each), "
              f"p {res.p_sign:.3g} (exact binomial)")
        if res.test == "score":
            print(f"score test on its probabilities ({res.score_units} units weighted by the gap between the pair's "
                  f"probabilities): p {res.p_value:.3g} (exact sign-flip)")
        print(f"p-value {res.p_value:.3g} ({res.test} test); alpha {res.alpha:g}")
        print("DETECTED: the suspect reproduces the keyed answers" if res.detected else "not detected at this alpha")
    return 0


def quantize(
    run_dir: Annotated[str, typer.Argument(help="A finished run's directory (model.pt + model.json).")],
    out: Annotated[str | None, typer.Option("--out", help="Output directory; default RUN_DIR/int8.")] = None,
    calibration: Annotated[str, typer.Option("--calibration", help="Calibration rows for a CNN: 'synthetic' (no records) or a "
                                                                   "table (.csv/.parquet) read with the model card.")] = "synthetic",
    rows: Annotated[int, typer.Option("--rows", help="Calibration rows to use.")] = 512,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty output directory.")] = False,
) -> int:
    """INT8 post-training quantization of a run's model (dynamic for linear layers, static with calibration for a CNN)."""
    from fedseek.serving.quantize import QuantizeError, quantize_run

    try:
        res = quantize_run(run_dir, out, calibration=calibration, rows=rows, force=force)
    except QuantizeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    ratio = res.fp32_bytes / max(res.int8_bytes, 1)
    size = f"{ratio:.2f}x smaller" + ("" if ratio >= 3.5 else "; a model this small is mostly file overhead, its weights are 4x smaller")
    print(f"INT8 ({res.mode}) model: {res.out_dir / 'model_int8.pt'}  {res.fp32_bytes:,} -> {res.int8_bytes:,} bytes ({size}); "
          f"calibration: {res.calibration}")
    return 0


def calibrate_outputs(
    model: Annotated[str, typer.Option("--model", help="The served run's directory.")],
    table: Annotated[str, typer.Option("--table", help="A labelled table (e.g. the coordinator's test table).")],
    label_column: Annotated[str, typer.Option("--label-column", help="Its label column.")],
    cost: Annotated[float, typer.Option("--cost", help="Accuracy the marking may cost, in points (expected over keys).")] = 0.5,
) -> int:
    """The --watermark-margin whose expected accuracy cost on a labelled table stays within --cost points."""
    from fedseek.ops.serve import ServeError, calibrate_margin
    from fedseek.serving.predictor import PredictError

    try:
        choice = calibrate_margin(model, table, label_column, cost)
    except (ServeError, PredictError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"--watermark-margin {choice.margin:.4f}: marks {choice.marked_share:.1%} of the {choice.rows} rows, expected accuracy "
          f"cost {choice.expected_drop_points:.2f} points (budget {cost:g}); about {1000 * choice.marked_share:.0f} marks per 1000 "
          "similar queries (detection at p <= 1e-6 needs about 20-30 distinct neighbourhoods of them, units, that an extractor's "
          "model reproduces)")
    return 0


def register(app: typer.Typer, watermark_app: typer.Typer) -> None:
    """Add `serve` and `quantize` to the root command and `verify-outputs` to the watermark group."""
    app.command("serve")(serve)
    app.command("quantize")(quantize)
    watermark_app.command("verify-outputs")(verify_outputs)
    watermark_app.command("calibrate-outputs")(calibrate_outputs)
