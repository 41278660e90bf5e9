"""`report.html`: one self-contained page per run directory, built from its outputs.

Reads RUN_DIR/metrics.jsonl (one JSON object per round), RUN_DIR/summary.json and, when
present, RUN_DIR/audit.jsonl (failure reasons) and RUN_DIR/model.json. Writes
RUN_DIR/report.html: PNG plots embedded as base64 data URIs (matplotlib, Agg canvas, no
pyplot state), inline CSS, no script and no external asset, so the file can be mailed or
archived on its own. Every piece of text from the run is HTML-escaped.

The page degrades instead of failing: a missing or corrupt file, missing fields, one round,
no DP, no watermark or no rounds at all each give a page that says what is missing. A plot
that cannot be drawn is replaced by a one-line note.

    python -m fedseek.outputs.report RUN_DIR      # writes RUN_DIR/report.html and prints its path
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPORT_NAME = "report.html"
MAX_TABLE_ROWS = 500  # rejections / failures / refusals listed before "... and N more"
MAX_SITE_LINES = 30  # above this many sites the epsilon plot shows min / median / max instead of one line each
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")

COLORS = {"accepted": "#2e7d32", "rejected": "#c62828", "refused": "#ef6c00", "failed": "#616161", "timed_out": "#6a1b9a"}


# ---------------------------------------------------------------------------- reading
def _load_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        notes.append(f"{path.name} is missing")
        return None
    try:
        obj = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return None
    return obj


def _load_jsonl(path: Path, notes: list[str], *, required: bool) -> list[dict[str, Any]]:
    """Every line that parses as a JSON object; bad lines are skipped and counted in `notes`."""
    if not path.exists():
        if required:
            notes.append(f"{path.name} is missing")
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        notes.append(f"{path.name} could not be read ({exc})")
        return []
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) skipped (not a JSON object; a partial last line is normal after a crash)")
    return rows


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, a string, a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _clean(text: Any, limit: int = 400) -> str:
    """Printable one-paragraph text: ANSI colour codes and control characters removed, shortened."""
    s = _CTRL.sub(" ", _ANSI.sub("", str(text)))
    s = re.sub(r"[\^~]{3,}", " ", s)  # traceback underline markers
    s = re.sub(r"\s+", " ", s).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _rounds(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a usable integer round, sorted; a later row for the same round wins (resumed runs)."""
    by_round: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(metrics, 1):
        r = _num(row.get("round"))
        by_round[int(r) if r is not None else i] = row
    return [{**by_round[k], "round": k} for k in sorted(by_round)]


# ---------------------------------------------------------------------------- formatting
def _mpl(text: Any) -> str:
    """Text for a matplotlib label: a '$' in a site name must not start mathtext."""
    return str(text).replace("$", r"\$")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    if v is None:
        return "—" if x is None else _e(x)
    if v == int(v) and abs(v) < 1e15 and not isinstance(x, float):
        return f"{int(v):,}"
    if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e7):
        return f"{v:.{max(1, digits - 1)}e}"
    return f"{v:.{digits}f}"


def _bytes(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {unit}"
    return f"{int(v)} B"


def _seconds(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if v < 120:
        return f"{v:.1f} s"
    return f"{int(v // 60)} min {v % 60:.0f} s"


def _table(headers: list[str], rows: Iterable[list[Any]], cls: str = "") -> str:
    """Cells are escaped here; pass raw values."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, height: float = 3.3):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6 * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("round")
    return fig, list(axes)


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _int_rounds(ax, xs: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if xs and max(xs) - min(xs) <= 15:
        ax.xaxis.set_major_locator(FixedLocator(list(range(int(min(xs)), int(max(xs)) + 1))))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        lo, hi = min(xs), max(xs)
        pad = max(0.5, 0.01 * (hi - lo))  # bars are 0.8 wide
        ax.set_xlim(lo - pad, hi + pad)


def _series(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        try:
            v = _num(get(row))
        except Exception:  # noqa: BLE001 - odd shapes count as missing
            v = None
        if v is not None:
            xs.append(row["round"])
            ys.append(v)
    return xs, ys


def _plot_accuracy(rows, summary) -> Any:
    initial = _dict(_dict(summary).get("initial"))
    fig, (ax1, ax2) = _figure(2)
    drawn = False
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "ROC AUC")):
        xs, ys = _series(rows, lambda r, k=key: _dict(r.get("central")).get(k))
        if xs and _num(initial.get(key)) is not None:
            xs, ys = [0] + xs, [float(initial[key])] + ys
        if xs:
            ax1.plot(xs, ys, marker="o", ms=3.5, label=label)
            drawn = True
    ax1.set_title("central evaluation (round 0 = initial model)")
    ax1.set_ylabel("score")
    xs, ys = _series(rows, lambda r: _dict(r.get("central")).get("loss"))
    if xs and _num(initial.get("loss")) is not None:
        xs, ys = [0] + xs, [float(initial["loss"])] + ys
    if xs:
        ax2.plot(xs, ys, marker="o", ms=3.5, label="central test loss")
        drawn = True
    xs, ys = _series(rows, lambda r: r.get("train_loss"))
    if xs:
        ax2.plot(xs, ys, marker="s", ms=3.5, ls="--", label="train loss (sites, weighted)")
        drawn = True
    ax2.set_title("loss")
    ax2.set_ylabel("loss")
    if not drawn:
        return None
    all_x = [0] + [r["round"] for r in rows] if initial else [r["round"] for r in rows]
    for ax in (ax1, ax2):
        _int_rounds(ax, all_x)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _epsilon_tracks(rows) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float, str]]]:
    """Per site [(round, epsilon)] as reported, and refusals [(round, projected epsilon or spent, site)]."""
    tracks: dict[str, list[tuple[int, float]]] = {}
    refusals: list[tuple[int, float, str]] = []
    for row in rows:
        for site, view in _dict(row.get("sites")).items():
            view = _dict(view)
            eps = _num(view.get("epsilon"))
            if view.get("status") == "refused":
                y = _num(view.get("projected-epsilon"))
                y = y if y is not None else eps
                if y is not None:
                    refusals.append((row["round"], y, str(site)))
                continue
            if eps is not None:
                tracks.setdefault(str(site), []).append((row["round"], eps))
    return tracks, refusals


def _carry_forward(track: list[tuple[int, float]], rounds: list[int]) -> list[float | None]:
    """Epsilon is cumulative: between reports a site keeps what it last reported."""
    known = dict(track)
    out: list[float | None] = []
    last = None
    for r in rounds:
        last = known.get(r, last)
        out.append(last)
    return out


def _plot_epsilon(rows, budget: float | None) -> Any:
    tracks, refusals = _epsilon_tracks(rows)
    if not tracks and not refusals:
        return None
    rounds = [r["round"] for r in rows]
    fig, (ax,) = _figure(1, 3.8)
    fig.set_size_inches(11.2, 3.8)
    names = sorted(tracks)
    if len(names) <= MAX_SITE_LINES:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
        for i, name in enumerate(names):
            ys = _carry_forward(tracks[name], rounds)
            xs = [x for x, y in zip(rounds, ys, strict=False) if y is not None]
            ys = [y for y in ys if y is not None]
            ax.step(xs + [xs[-1] + 0.4], ys + [ys[-1]], where="post", color=cmap(i % cmap.N), lw=1.4, label=_mpl(name))
            ax.plot(*zip(*tracks[name], strict=False), ls="none", marker="o", ms=3, color=cmap(i % cmap.N))
        title = "epsilon spent per site (step = unchanged between rounds it trained)"
    else:
        import numpy as np

        mat = np.full((len(names), len(rounds)), np.nan)
        for i, name in enumerate(names):
            for j, v in enumerate(_carry_forward(tracks[name], rounds)):
                if v is not None:
                    mat[i, j] = v
        cols = [j for j in range(len(rounds)) if not np.all(np.isnan(mat[:, j]))]
        xs = [rounds[j] for j in cols]
        sub = mat[:, cols]
        sub = np.concatenate([sub, sub[:, -1:]], axis=1)  # the last round's value gets a visible width
        xs = xs + [xs[-1] + 0.4]
        lo, med, hi = np.nanmin(sub, 0), np.nanmedian(sub, 0), np.nanmax(sub, 0)
        ax.fill_between(xs, lo, hi, step="post", alpha=0.25, color="#1565c0", label=f"min–max over {len(names)} sites")
        ax.step(xs, med, where="post", color="#1565c0", lw=1.6, label="median site")
        ax.step(xs, hi, where="post", color="#0d47a1", lw=1.0, ls=":", label="max site")
        title = f"epsilon spent per site ({len(names)} sites: spread shown instead of one line each)"
    if refusals:
        rx, ry, _ = zip(*refusals, strict=False)
        ax.plot(rx, ry, ls="none", marker="x", ms=7, mew=2, color=COLORS["refused"], label="refused round (epsilon it would reach)")
    if budget is not None:
        ax.axhline(budget, color="#b71c1c", ls="--", lw=1.5, label=f"budget ε = {budget:g}")
    tops = [e for t in tracks.values() for _, e in t] + [y for _, y, _ in refusals] + ([budget] if budget is not None else [])
    ax.set_ylim(0, max(tops + [1e-3]) * 1.08)
    ax.set_ylabel("epsilon (per site)")
    ax.set_title(title)
    _int_rounds(ax, rounds)
    n_labels = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_labels <= 16 else 2, frameon=False)
    return fig


def _byte_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: _bytes(v))


def _plot_bytes(rows, summary) -> Any:
    fig, (ax1, ax2) = _figure(2)
    drawn = False
    top = 0.0
    for key, label, style, ms in (("bytes_up", "up (payload)", "-o", 5.5), ("wire_bytes_up", "up (on the wire)", ":^", 3.5), ("bytes_down", "down", "--s", 3.0)):
        xs, ys = _series(rows, lambda r, k=key: r.get(k))
        if xs:
            ax1.plot(xs, ys, style, ms=ms, label=label)
            top = max([top] + ys)
            drawn = True
    if not drawn:
        return None
    ax1.set_title("bytes per round (all sites)")
    ax1.yaxis.set_major_formatter(_byte_formatter())
    ax1.set_ylim(0, max(top, 1.0) * 1.1)
    ax1.legend(fontsize=8)
    comp = _dict(_dict(summary).get("compression"))
    overall = _num(comp.get("ratio_up"))
    xs, ys = _series(rows, lambda r: (r["dense_bytes_up"] / r["bytes_up"]) if _num(r.get("bytes_up")) else None)
    if xs:
        ax2.plot(xs, ys, "-o", ms=3.5, color="#6a1b9a", label="dense / payload (up)")
        ax2.set_ylabel("compression ratio (x)")
        ax2.set_ylim(bottom=0)
        ax2.set_title("upload compression ratio per round")
        if overall is not None:
            ax2.axhline(overall, ls="--", color="#9e9e9e", label=f"whole run {overall:.2f}x")
        ax2.legend(fontsize=8)
    else:
        import numpy as np

        for key, label, style in (("bytes_up", "up (payload)", "-"), ("bytes_down", "down", "--")):
            xs, ys = _series(rows, lambda r, k=key: r.get(k))
            if xs:
                ax2.plot(xs, np.cumsum(ys), style, lw=2 if style == "-" else 1.5, marker="o" if len(xs) == 1 else None, label=label)
        ax2.yaxis.set_major_formatter(_byte_formatter())
        ax2.set_ylim(bottom=0)
        codec = comp.get("codec")
        ratio = f", upload ratio {overall:.2f}x" if overall is not None else ""
        ax2.set_title(_mpl(f"cumulative bytes (codec {_clean(codec, 20) if codec else 'n/a'}{ratio})"))
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        _int_rounds(ax, [r["round"] for r in rows])
    return fig


def _plot_participation(rows) -> Any:
    import numpy as np

    fig, (ax1, ax2) = _figure(2)
    xs = [r["round"] for r in rows]
    bottom = np.zeros(len(rows))
    drawn = False
    for key in ("accepted", "rejected", "refused", "failed", "timed_out"):
        vals = np.array([_num(r.get(key)) or 0.0 for r in rows])
        if vals.any() or key == "accepted":
            ax1.bar(xs, vals, bottom=bottom, color=COLORS[key], label=key.replace("_", " "), width=0.8)
            bottom += vals
            drawn = drawn or bool(vals.any())
    sx, sy = _series(rows, lambda r: r.get("sampled"))
    if sx:
        ax1.plot(sx, sy, ls="none", marker="_", ms=14, mew=2, color="black", label="sampled")
        drawn = True
    ax1.set_title("sites per round")
    ax1.set_ylabel("sites")
    top = max([float(bottom.max()) if len(bottom) else 0.0] + sy)
    ax1.set_ylim(0, max(1.0, top) * 1.3)  # headroom for the legend above the bars
    ax1.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    _int_rounds(ax1, xs)
    tx, ty = _series(rows, lambda r: r.get("round_seconds"))
    if tx:
        ax2.bar(tx, ty, color="#546e7a", width=0.8)
        ax2.set_title("round wall time (round 1 includes start-up)")
        ax2.set_ylabel("seconds")
        _int_rounds(ax2, tx)
    else:
        ax2.set_visible(False)
    return fig if drawn or tx else None


def _plot_watermark(rows, wm_summary) -> Any:
    xs, ps = _series(rows, lambda r: _dict(r.get("watermark")).get("p_value"))
    if not xs:
        return None
    fig, (ax1, ax2) = _figure(2)
    floor = 1e-300
    clipped = any(p < floor for p in ps)
    ax1.semilogy(xs, [max(p, floor) for p in ps], "-o", ms=3.5, color="#00695c", label="p-value after embedding")
    alpha = _num(_dict(wm_summary).get("alpha"))
    if alpha is not None and alpha > 0:
        ax1.axhline(alpha, color="#b71c1c", ls="--", label=f"alpha = {alpha:g} (detected below)")
    ax1.set_title("watermark p-value (exact binomial, log scale)" + (" — 0 drawn at 1e-300" if clipped else ""), fontsize=10)
    ax1.set_ylabel("p-value")
    ax1.legend(fontsize=8)
    _int_rounds(ax1, xs)
    drawn = False
    for key, label, style in (("trigger_accuracy_before", "before embedding", ":s"), ("trigger_accuracy", "after embedding", "-o")):
        tx, ty = _series(rows, lambda r, k=key: _dict(r.get("watermark")).get(k))
        if tx:
            ax2.plot(tx, ty, style, ms=3.5, label=label)
            drawn = True
    k = _num(_dict(wm_summary).get("num_classes"))
    if k:
        ax2.axhline(1.0 / k, color="#9e9e9e", ls="--", label=f"chance 1/{int(k)}")
    if drawn:
        ax2.set_ylim(0, 1.05)
        ax2.set_title("trigger-set accuracy")
        ax2.legend(fontsize=8)
        _int_rounds(ax2, xs)
    else:
        ax2.set_visible(False)
    return fig


def _plot_sparsity(rows) -> Any:
    xs, ys = _series(rows, lambda r: r.get("sparsity"))
    if not any(y > 0 for y in ys):
        return None
    fig, (ax,) = _figure(1)
    ax.plot(xs, ys, "-o", ms=3.5, color="#4e342e")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of weights pruned")
    ax.set_title("model sparsity per round")
    _int_rounds(ax, xs)
    return fig


def _render_plot(title: str, anchor: str, build: Callable[[], Any], caption: str = "") -> tuple[str, bool]:
    """(html, drawn). A figure that fails to draw becomes a note, never an exception."""
    try:
        import matplotlib

        with matplotlib.rc_context({"text.usetex": False, "font.size": 9}):
            fig = build()
            uri = _png(fig) if fig is not None else None
    except Exception as exc:  # noqa: BLE001 - the report must not fail because one plot did
        return (f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2><p class="note">plot unavailable '
                f"({_e(type(exc).__name__)}: {_e(_clean(exc, 200))})</p></section>"), False
    if uri is None:
        return "", False
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2><figure><img alt="{_e(title)}" src="{uri}">{cap}</figure></section>'), True


# ---------------------------------------------------------------------------- sections
def _known_sites(rows, summary, audit) -> set[str]:
    """Every site name the run mentions (joined, trained, refused, rejected, failed)."""
    names = {str(n) for n in _dict(_dict(_dict(summary).get("privacy")).get("sites"))}
    for row in rows:
        names |= {str(n) for n in _dict(row.get("sites"))}
        names |= {str(_dict(r).get("site")) for r in _list(row.get("rejections")) + _list(row.get("refusals")) if _dict(r).get("site")}
    names |= {str(a["site"]) for a in audit if a.get("site") and a.get("event") in ("site_joined", "site_failed", "update_rejected")}
    return names


def _privacy_info(rows, summary) -> dict[str, Any]:
    priv = _dict(_dict(summary).get("privacy"))
    budget = _num(priv.get("epsilon_budget"))
    any_eps = False
    for row in rows:
        for view in _dict(row.get("sites")).values():
            view = _dict(view)
            any_eps = any_eps or _num(view.get("epsilon")) is not None
            if budget is None and _num(view.get("epsilon-budget")) is not None:
                budget = float(view["epsilon-budget"])
    return {"enabled": bool(priv.get("enabled")) or any_eps, "budget": budget, "summary": priv}


def _site_table(rows, summary, privacy: dict[str, Any]) -> str:
    """Per-site privacy (DP on) or participation (DP off), merged from summary.json and metrics.jsonl."""
    per: dict[str, dict[str, Any]] = {}
    for name, s in _dict(privacy["summary"].get("sites")).items():
        per.setdefault(str(name), {}).update({k: v for k, v in _dict(s).items() if v is not None})
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, view in _dict(row.get("sites")).items():
            view = _dict(view)
            d = seen.setdefault(str(name), {"trained": 0, "refused": 0, "steps": 0.0, "have_steps": False})
            if view.get("status") == "refused":
                d["refused"] += 1
            else:
                d["trained"] += 1
                if _num(view.get("dp-steps")) is not None:
                    d["steps"] += float(view["dp-steps"])
                    d["have_steps"] = True
                for src, dst in (("epsilon", "epsilon"), ("delta", "delta"), ("noise-multiplier", "noise_multiplier"),
                                 ("sample-rate", "sample_rate"), ("num-examples", "num_examples"), ("train-loss", "train_loss")):
                    if _num(view.get(src)) is not None:
                        d[dst] = view[src]
            d["last_status"] = f"{view.get('status', '?')} (round {row['round']})"
    excluded = _dict(_dict(summary).get("excluded_sites"))
    names = sorted(set(per) | set(seen))
    if not names:
        return '<p class="note">No per-site information was recorded.</p>'
    budget = privacy["budget"]
    body = []
    for name in names:
        s, m = per.get(name, {}), seen.get(name, {})
        eps = s.get("epsilon", m.get("epsilon"))
        pct = 100 * float(eps) / budget if budget and _num(eps) is not None else None
        used = "—" if pct is None else f"{pct:.1f}%" if pct < 99.95 else f"{pct:.2f}%"
        steps = s.get("steps") if _num(s.get("steps")) is not None else (m["steps"] if m.get("have_steps") else None)
        trained = s.get("rounds_trained", m.get("trained"))
        refusals = s.get("refusals", m.get("refused"))
        note = _clean(excluded[name], 160) if name in excluded else (m.get("last_status") or "")
        if privacy["enabled"]:
            body.append([name, _fmt(eps), used, _fmt(s.get("delta", m.get("delta")), 2), _fmt(s.get("noise_multiplier", m.get("noise_multiplier")), 3),
                         _fmt(s.get("sample_rate", m.get("sample_rate")), 3), _fmt(steps, 0), _fmt(trained), _fmt(refusals),
                         _fmt(m.get("num_examples"), 0), note])
        else:
            body.append([name, _fmt(trained), _fmt(refusals), _fmt(m.get("num_examples"), 0), _fmt(m.get("train_loss")), note])
    if privacy["enabled"]:
        headers = ["site", "epsilon", "of budget", "delta", "noise multiplier", "sample rate", "DP steps", "rounds trained",
                   "refusals", "examples", "last status / exclusion"]
    else:
        headers = ["site", "rounds trained", "refusals", "examples", "last train loss", "last status / exclusion"]
    note = ""
    missing = sorted(set(seen) - set(per)) if per else []
    if privacy["enabled"]:
        note = ('<p class="note">Epsilon is what each site reported with its last accepted update (its ledger may hold more: '
                "rounds whose update was rejected or failed still spent budget at the site). DP steps are summed over accepted rounds.</p>")
    if missing:
        note += f'<p class="note">{len(missing)} site(s) appear in metrics.jsonl but not in summary.json.</p>'
    return _table(headers, body, "sites") + note


def _capped(items: list[list[Any]], headers: list[str], what: str) -> str:
    if not items:
        return f'<p class="ok">No {_e(what)}.</p>'
    more = len(items) - MAX_TABLE_ROWS
    out = _table(headers, items[:MAX_TABLE_ROWS], "events")
    if more > 0:
        out += f'<p class="note">… and {more:,} more {_e(what)} (see the run files).</p>'
    return out


def _events_section(rows, summary, audit) -> str:
    rejections = [r for r in _list(_dict(summary).get("rejections")) if isinstance(r, dict)]
    if not rejections:  # from the rounds instead (no summary, or an older one)
        rejections = [{"round": row["round"], **_dict(r)} for row in rows for r in _list(row.get("rejections"))]
    rej = [[_fmt(r.get("round")), _clean(r.get("site") or r.get("node_id") or "?", 80), _clean(r.get("reason", ""))] for r in rejections]
    by_reason: dict[str, int] = {}
    for r in rejections:
        key = _NUMBER.sub("N", _clean(r.get("reason", ""), 120))
        by_reason[key] = by_reason.get(key, 0) + 1
    parts = ["<h3>Rejected updates</h3>"]
    if by_reason and len(rej) > 3:
        parts.append(_table(["reason (numbers as N)", "count"], sorted(([k, v] for k, v in by_reason.items()), key=lambda kv: -kv[1]), "compact"))
    parts.append(_capped(rej, ["round", "site", "reason"], "rejected updates"))
    refusals = [[_fmt(row["round"]), _clean(_dict(r).get("site", "?"), 80), _clean(_dict(r).get("reason", ""))]
                for row in rows for r in _list(row.get("refusals"))]
    parts += ["<h3>Refused rounds (privacy budget)</h3>", _capped(refusals, ["round", "site", "reason"], "refused rounds")]
    failed = [[_fmt(a.get("round")), _clean(a.get("site") or "?", 80), _clean(a.get("reason", ""), 300)] for a in audit if a.get("event") == "site_failed"]
    n_failed = sum(int(_num(row.get("failed")) or 0) + int(_num(row.get("timed_out")) or 0) for row in rows)
    parts.append("<h3>Failed replies and time-outs</h3>")
    if failed:
        parts.append(_capped(failed, ["round", "site", "reason (from audit.jsonl)"], "failures"))
    elif n_failed:
        parts.append(f'<p class="note">{n_failed:,} failed or timed-out replies (no audit.jsonl with their reasons).</p>')
    else:
        parts.append('<p class="ok">No failed replies.</p>')
    return '<section id="events"><h2>Rejected, refused and failed</h2>' + "".join(parts) + "</section>"


def _rounds_table(rows) -> str:
    body = []
    for r in rows:
        c = _dict(r.get("central"))
        wm = _dict(r.get("watermark"))
        body.append([r["round"], _fmt(c.get("accuracy")), _fmt(c.get("auc")) if "auc" in c else "—", _fmt(c.get("loss")), _fmt(r.get("train_loss")),
                     _fmt(r.get("sampled")), _fmt(r.get("accepted")), _fmt(r.get("rejected")), _fmt(r.get("refused")),
                     _fmt(int((_num(r.get("failed")) or 0) + (_num(r.get("timed_out")) or 0))) if ("failed" in r or "timed_out" in r) else "—",
                     _bytes(r.get("bytes_up")), _bytes(r.get("bytes_down")), _fmt(r.get("sparsity"), 3), _fmt(wm.get("p_value"), 3) if wm else "—",
                     _fmt(r.get("round_seconds"), 2)])
    headers = ["round", "accuracy", "AUC", "loss", "train loss", "sampled", "accepted", "rejected", "refused", "failed", "bytes up",
               "bytes down", "sparsity", "watermark p", "seconds"]
    return (f'<section id="rounds"><h2>Per round</h2><details{" open" if len(rows) <= 30 else ""}><summary>{len(rows)} round(s)</summary>'
            + _table(headers, body, "rounds") + "</details></section>")


def _flatten(prefix: str, obj: Any, out: list[list[str]]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if prefix in ("privacy",) and k == "sites":
                out.append([f"{prefix}.sites", f"{len(_dict(v))} site(s): see the table above"])
                continue
            if k in ("rejections",) and isinstance(v, list):
                out.append([f"{prefix}.{k}".lstrip("."), f"{len(v)} item(s): see above"])
                continue
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list):
        out.append([prefix, _clean(json.dumps(obj, default=str), 300) if obj else "[]"])
    else:
        if isinstance(obj, float):
            val = f"{obj:.6g}" if math.isfinite(obj) else str(obj)
        elif obj is None:
            val = "—"
        else:
            val = _clean(obj, 300)
        out.append([prefix, val])


def _summary_section(summary) -> str:
    if not summary:
        return '<section id="summary"><h2>Final summary</h2><p class="warn">summary.json is missing or unreadable: the run did not finish (or is still running).</p></section>'
    rows: list[list[str]] = []
    _flatten("", summary, rows)
    return '<section id="summary"><h2>Final summary (summary.json)</h2>' + _table(["field", "value"], rows, "kv") + "</section>"


def _header(run_dir: Path, rows, summary, model, privacy, notes) -> str:
    s = _dict(summary)
    last_central = _dict(rows[-1].get("central")) if rows else {}
    final = _dict(s.get("final")) or last_central
    name = s.get("name") or run_dir.name
    cards: list[tuple[str, str]] = []
    acc = final.get("accuracy", s.get("final_accuracy"))
    cards.append(("final accuracy", _fmt(acc)))
    if "auc" in final:
        cards.append(("final ROC AUC", _fmt(final.get("auc"))))
    if "balanced_accuracy" in final:
        cards.append(("balanced accuracy", _fmt(final.get("balanced_accuracy"))))
    init = _dict(s.get("initial"))
    if _num(init.get("accuracy")) is not None:
        cards.append(("initial accuracy", _fmt(init.get("accuracy"))))
    planned = s.get("rounds")
    done = s.get("rounds_completed", len(rows) if rows else None)
    cards.append(("rounds", f"{_fmt(done)} / {_fmt(planned)}" if planned is not None else _fmt(done)))
    n_sites = s.get("num_sites")
    if n_sites is None and rows:
        n_sites = max((_num(r.get("sampled")) or 0) for r in rows) or None
    cards.append(("sites", _fmt(n_sites)))
    wall = s.get("wall_seconds")
    if wall is None and rows:
        wall = sum(_num(r.get("round_seconds")) or 0.0 for r in rows) or None
    cards.append(("wall time", _seconds(wall)))
    if privacy["enabled"]:
        p = privacy["summary"]
        max_eps = _num(p.get("max_epsilon"))
        if max_eps is None:
            tracks, _ = _epsilon_tracks(rows)
            vals = [e for t in tracks.values() for _, e in t]
            max_eps = max(vals) if vals else None
        b = privacy["budget"]
        cards.append(("max epsilon / budget", f"{_fmt(max_eps, 4)} / {f'{b:g}' if b is not None else '—'}"))
    else:
        cards.append(("differential privacy", "off"))
    wm = _dict(s.get("watermark"))
    if wm:
        cards.append(("watermark", ("detected" if wm.get("detected") else "NOT detected") + f", p = {_fmt(wm.get('p_value'), 3)}"))
    tot_rej = s.get("rejected_updates", sum(int(_num(r.get("rejected")) or 0) for r in rows) if rows else None)
    tot_ref = s.get("refused_rounds", sum(int(_num(r.get("refused")) or 0) for r in rows) if rows else None)
    tot_fail = s.get("failed_replies", sum(int((_num(r.get("failed")) or 0) + (_num(r.get("timed_out")) or 0)) for r in rows) if rows else None)
    cards.append(("rejected / refused / failed", f"{_fmt(tot_rej)} / {_fmt(tot_ref)} / {_fmt(tot_fail)}"))
    up = s.get("bytes_up", sum(_num(r.get("bytes_up")) or 0 for r in rows) if rows else None)
    down = s.get("bytes_down", sum(_num(r.get("bytes_down")) or 0 for r in rows) if rows else None)
    cards.append(("bytes up / down", f"{_bytes(up)} / {_bytes(down)}"))
    ratio = _num(_dict(s.get("compression")).get("ratio_up"))
    if ratio is not None and abs(ratio - 1.0) > 1e-9:
        cards.append(("upload compression", f"{ratio:.2f}x ({_clean(_dict(s.get('compression')).get('codec'), 20)})"))
    spars = _num(s.get("sparsity"))
    if spars:
        cards.append(("final sparsity", f"{100 * spars:.1f}%"))
    card_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards)
    facts = [("run directory", str(run_dir)), ("dataset", s.get("dataset")), ("strategy", s.get("strategy")), ("run id", s.get("run_id")),
             ("seed", s.get("seed"))]
    if model:
        facts.append(("model", ", ".join(f"{k}={_clean(v, 60)}" for k, v in model.items())))
    if privacy["enabled"]:
        p = privacy["summary"]
        facts.append(("privacy", f"record-level DP-SGD per site, delta {_fmt(p.get('delta'), 2)}, accountant {p.get('accountant') or '—'}"))
    facts_html = " · ".join(f"<span><b>{_e(k)}</b> {_e(_clean(v, 200))}</span>" for k, v in facts if v not in (None, ""))
    banners = ""
    if not summary:
        banners += '<p class="warn">No usable summary.json: the run did not finish (or is still running); this page is built from metrics.jsonl alone.</p>'
    if s.get("stop_reason"):
        banners += f'<p class="warn">Stopped early: {_e(_clean(s["stop_reason"]))}</p>'
    if notes:
        banners += '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return (f"<header><h1>fedseek run report: {_e(_clean(name, 120))}</h1><p class=\"facts\">{facts_html}</p>{banners}"
            f'<div class="cards">{card_html}</div></header>')


CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#d9e2ec;--bg:#f5f7fa;--accent:#1565c0}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
header{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin-bottom:16px}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:17px;margin:0 0 10px;color:var(--accent)}
h3{font-size:14px;margin:14px 0 6px}
.facts{color:var(--muted);margin:0 0 12px}.facts span{margin-right:4px;white-space:nowrap}.facts b{color:var(--fg);font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 10px;background:#fbfcfd}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card .v{font-size:17px;font-weight:600;overflow-wrap:anywhere}
nav{margin:0 0 16px;font-size:13px}nav a{color:var(--accent);margin-right:12px;text-decoration:none}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin-bottom:16px;overflow-x:auto}
figure{margin:0}figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7;position:sticky;top:0}
tbody tr:nth-child(even){background:#f8fafc}
table.compact,table.kv{width:auto}table.compact{margin-bottom:10px}table.kv td:first-child{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--muted)}
table.events td,table.kv td{overflow-wrap:anywhere}table.events td:not(:last-child){white-space:nowrap}
table.rounds td,table.sites td{white-space:nowrap}table.sites td:last-child{white-space:normal}
.note{color:var(--muted);font-size:12.5px}.ok{color:#2e7d32}
.warn{background:#fff4e5;border:1px solid #ffb74d;border-radius:6px;padding:8px 12px;margin:8px 0}
ul.notes{color:var(--muted);font-size:12.5px;margin:6px 0 10px}
footer{color:var(--muted);font-size:12px;text-align:center}
"""


def build_report(run_dir: str | Path) -> str:
    """The report page for `run_dir` as an HTML string (nothing is written)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    metrics = _load_jsonl(run_dir / "metrics.jsonl", notes, required=True)
    summary = _load_json(run_dir / "summary.json", notes)
    audit = _load_jsonl(run_dir / "audit.jsonl", notes, required=False)
    model = _load_json(run_dir / "model.json", []) if (run_dir / "model.json").exists() else None
    rows = _rounds(metrics)
    privacy = _privacy_info(rows, summary)
    parts = [_header(run_dir, rows, summary, model, privacy, [n for n in notes if not n.startswith("summary.json")])]
    body: list[str] = []
    nav: list[tuple[str, str]] = []
    if not rows:
        body.append('<section id="empty"><h2>No rounds recorded</h2><p class="warn">metrics.jsonl holds no completed round '
                    "(the run failed before round 1, is still starting, or this is not a fedseek run directory). "
                    "There is nothing to plot.</p></section>")
    else:
        budget = privacy["budget"]
        wm_summary = _dict(_dict(summary).get("watermark"))
        plots = [
            ("Accuracy and loss", "accuracy", lambda: _plot_accuracy(rows, summary), "Central evaluation of the global model on the held-out test set after each round; train loss is the example-weighted mean the accepted sites reported."),
        ]
        if privacy["enabled"]:
            caption = ("Each site's cumulative (epsilon, delta)-DP spend as reported with its accepted updates; a site that refuses "
                       "a round because it would pass its budget is excluded from then on.")
            tracks, _ = _epsilon_tracks(rows)
            finals = [t[-1][1] for t in tracks.values() if t]
            if len(finals) > 1 and max(finals) > 0 and (max(finals) - min(finals)) <= 0.02 * max(finals):
                caption += (f" The {len(finals)} sites' lines end within {max(finals) - min(finals):.3g} of each other, "
                            "so they overlap in the plot (see the table below for each site).")
            silent = sorted(_known_sites(rows, summary, audit) - set(tracks))
            if silent:
                shown = ", ".join(silent[:10]) + (f" and {len(silent) - 10} more" if len(silent) > 10 else "")
                caption += f" Not drawn: {len(silent)} site(s) with no accepted update, hence no reported epsilon ({shown})."
            plots.append(("Privacy spent (epsilon per site)", "privacy", lambda: _plot_epsilon(rows, budget), caption))
        plots += [
            ("Communication", "bytes", lambda: _plot_bytes(rows, summary), "Payload bytes of accepted uploads, the same on the wire (with framing), and the global model sent down to sampled sites."),
            ("Participation", "participation", lambda: _plot_participation(rows), "Stacked: accepted updates, updates rejected by validation, privacy refusals, failed replies and time-outs; the black tick is the number of sites sampled."),
            ("Watermark", "watermark", lambda: _plot_watermark(rows, wm_summary), "Verification after each round's embedding: exact binomial test of trigger-set matches against chance (1/K)."),
            ("Sparsity", "sparsity", lambda: _plot_sparsity(rows), "Share of the global model's weights held at zero by the pruning mask."),
        ]
        for title, anchor, build, caption in plots:
            html_part, drawn = _render_plot(title, anchor, build, caption)
            if html_part:
                body.append(html_part)
                nav.append((anchor, title))
        if not privacy["enabled"]:
            body.append('<section id="privacy"><h2>Privacy</h2><p class="note">Differential privacy was off in this run: '
                        "site updates are not DP outputs.</p></section>")
        if not any(a == "watermark" for a, _ in nav) and not wm_summary:
            body.append('<p class="note">No watermark in this run.</p>')
    site_title = "Per-site privacy" if privacy["enabled"] else "Per-site participation"
    body.append(f'<section id="sites"><h2>{_e(site_title)}</h2>{_site_table(rows, summary, privacy)}</section>')
    nav.append(("sites", site_title))
    body.append(_events_section(rows, summary, audit))
    nav.append(("events", "Rejected / refused / failed"))
    if rows:
        body.append(_rounds_table(rows))
        nav.append(("rounds", "Per round"))
    body.append(_summary_section(summary))
    nav.append(("summary", "Final summary"))
    nav_html = "<nav>" + "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in nav) + "</nav>"
    title = _dict(summary).get("name") or run_dir.name
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>fedseek report: {_e(_clean(title, 120))}</title><style>{CSS}</style></head><body><main>"
        + "".join(parts) + nav_html + "".join(body)
        + f"<footer>generated by fedseek.outputs.report at {_e(generated)} from {_e(run_dir)}</footer></main></body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html (atomically) and return its path."""
    from fedseek.files import atomic_write_bytes

    run_dir = Path(run_dir)
    path = run_dir / REPORT_NAME
    atomic_write_bytes(path, build_report(run_dir).encode("utf-8"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # a page to share, unlike the 0600 temp file it was written through
    return path


def main(argv: list[str] | None = None) -> int:
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
