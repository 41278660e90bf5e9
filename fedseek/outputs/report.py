"""`report.html`: one self-contained page per run directory, built from its outputs.

Reads RUN_DIR/metrics.jsonl and RUN_DIR/summary.json through the typed schema
(`fedseek.outputs.schema`) and, when present, RUN_DIR/audit.jsonl (failure reasons) and
RUN_DIR/model.json. Writes RUN_DIR/report.html: PNG plots embedded as base64 data URIs
(matplotlib, Agg canvas), inline CSS, no script and no external asset, so the file can be
mailed or archived on its own. The page is a Jinja2 template with autoescape on.

The page degrades instead of failing: a missing or invalid file, one round, no DP, no
watermark or no rounds at all each give a page that says what is missing. A plot that cannot
be drawn is replaced by a one-line note.

The work is split by job: `report_data` (read the run), `report_plots` (figures),
`report_view` (what the page shows), `report_render` (the template); this module ties them.

    python -m fedseek.outputs.report RUN_DIR      # writes RUN_DIR/report.html and prints its path
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedseek.files import atomic_write_bytes
from fedseek.outputs.report_data import load_run
from fedseek.outputs.report_render import render
from fedseek.outputs.report_view import build_view

__all__ = ["REPORT_NAME", "build_report", "main", "write_report"]

REPORT_NAME = "report.html"


def build_report(run_dir: str | Path) -> str:
    """The report page for `run_dir` as an HTML string (nothing is written)."""
    from fedseek.outputs.report_plots import draw_plots  # matplotlib: imported when a page is built, not with the CLI

    data = load_run(run_dir)
    return render(build_view(data, draw_plots(data)))


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html (atomically, readable as the umask allows: a page to share) and return its path."""
    run_dir = Path(run_dir)
    page = build_report(run_dir)
    umask = os.umask(0)
    os.umask(umask)
    return atomic_write_bytes(run_dir / REPORT_NAME, page.encode("utf-8"), mode=0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    """`python -m fedseek.outputs.report RUN_DIR`: write the report and print its path (2: not a directory, 1: write failed)."""
    parser = argparse.ArgumentParser(prog="python -m fedseek.outputs.report", description="Write RUN_DIR/report.html from a run's outputs.")
    parser.add_argument("run_dir", type=Path, help="a run directory (metrics.jsonl, summary.json)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        path = write_report(args.run_dir)
    except OSError as exc:
        print(f"error: could not write the report: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
