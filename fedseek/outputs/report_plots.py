"""The report's figures: matplotlib on the Agg canvas (no pyplot state), each returned as a PNG data URI.

Per-round curves come from metrics.jsonl rows; reference lines (initial model, budget,
alpha, whole-run ratio) from summary.json. A figure with nothing to show is left out; one
that fails to draw becomes a one-line note instead of failing the page.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

from fedseek.outputs.report_data import RunData, carry_forward, epsilon_tracks, known_sites
from fedseek.outputs.report_format import clean, fmt_bytes, mpl_text, num
from fedseek.outputs.report_view import PlotSection
from fedseek.outputs.schema import MetricsRow, RunSummary, WatermarkSummary

MAX_SITE_LINES = 30  # above this many sites the epsilon plot shows min / median / max instead of one line each
COLORS = {"accepted": "#2e7d32", "rejected": "#c62828", "refused": "#ef6c00", "failed": "#616161", "timed_out": "#6a1b9a"}
_COUNTS: tuple[tuple[str, Callable[[MetricsRow], int]], ...] = (
    ("accepted", lambda r: r.accepted), ("rejected", lambda r: r.rejected), ("refused", lambda r: r.refused),
    ("failed", lambda r: r.failed), ("timed_out", lambda r: r.timed_out))
Getter = Callable[[MetricsRow], float | int | None]


# ---------------------------------------------------------------------------- helpers
def _figure(ncols: int = 1, height: float = 3.3) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(5.6 * ncols, height), dpi=100, layout="constrained")
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("round")
    return fig, axes


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _int_rounds(ax: Axes, xs: Sequence[int]) -> None:
    if xs and max(xs) - min(xs) <= 15:
        ax.xaxis.set_major_locator(FixedLocator(list(range(int(min(xs)), int(max(xs)) + 1))))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        lo, hi = min(xs), max(xs)
        pad = max(0.5, 0.01 * (hi - lo))  # bars are 0.8 wide
        ax.set_xlim(lo - pad, hi + pad)


def _series(rows: list[MetricsRow], get: Getter) -> tuple[list[int], list[float]]:
    """(rounds, values) where the value is a finite number."""
    xs, ys = [], []
    for row in rows:
        v = num(get(row))
        if v is not None:
            xs.append(row.round)
            ys.append(v)
    return xs, ys


def _byte_formatter() -> FuncFormatter:
    return FuncFormatter(lambda v, _pos: fmt_bytes(v))


# ---------------------------------------------------------------------------- figures
def plot_accuracy(rows: list[MetricsRow], summary: RunSummary | None) -> Figure | None:
    """Central accuracy / balanced accuracy / AUC and the losses per round (round 0 = initial model)."""
    initial = (summary.initial if summary is not None else None) or {}
    fig, (ax1, ax2) = _figure(2)
    drawn = False
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "ROC AUC"), ("r2", "R²")):
        drawn = _curve(ax1, rows, _central(key), initial.get(key), marker="o", label=label) or drawn
    drawn = _federated_points(ax1, rows) or drawn
    ax1.set_title("central evaluation (round 0 = initial model)")
    ax1.set_ylabel("score")
    regression = any("r2" in r.central for r in rows)
    drawn = _curve(ax2, rows, _central("loss"), initial.get("loss"), marker="o",
                   label="central test MSE" if regression else "central test loss") or drawn
    drawn = _curve(ax2, rows, lambda r: r.train_loss, None, marker="s", ls="--", label="train loss (sites, weighted)") or drawn
    ax2.set_title("loss")
    ax2.set_ylabel("loss")
    if not drawn:
        return None
    all_x = [0] + [r.round for r in rows] if initial else [r.round for r in rows]
    for ax in (ax1, ax2):
        _int_rounds(ax, all_x)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _federated_points(ax: Axes, rows: list[MetricsRow]) -> bool:
    """Pooled federated accuracy on the sites' held-out splits, with its noise std as error bars; False if none."""
    fed = [(r.round, float(f.accuracy), f.accuracy_std or 0.0, f.noisy) for r in rows
           if (f := r.federated) is not None and f.accuracy is not None and num(f.accuracy) is not None]
    if not fed:
        return False
    label = "federated accuracy (sites' held-out, DP-noised ± std)" if any(n for *_, n in fed) else "federated accuracy (sites' held-out)"
    ax.errorbar([x for x, *_ in fed], [a for _, a, *_ in fed], yerr=[s for _, _, s, _ in fed], fmt="D", ms=4, capsize=3, label=label)
    return True


def _central(key: str) -> Getter:
    return lambda r: r.central.get(key)


def _curve(ax: Axes, rows: list[MetricsRow], get: Getter, start: float | None, *, marker: str, label: str, ls: str = "-") -> bool:
    """One per-round line, prefixed by the initial model's value at round 0 when known; False if nothing to draw."""
    xs, ys = _series(rows, get)
    first = num(start)
    if xs and first is not None:
        xs, ys = [0, *xs], [first, *ys]
    if xs:
        ax.plot(xs, ys, marker=marker, ms=3.5, ls=ls, label=label)
    return bool(xs)


def plot_epsilon(rows: list[MetricsRow], budget: float | None) -> Figure | None:
    """Each site's cumulative epsilon (a band above MAX_SITE_LINES sites), refusals and the budget."""
    tracks, refusals = epsilon_tracks(rows)
    if not tracks and not refusals:
        return None
    rounds = [r.round for r in rows]
    fig, (ax,) = _figure(1, 3.8)
    fig.set_size_inches(11.2, 3.8)
    if len(tracks) <= MAX_SITE_LINES:
        title = _epsilon_lines(ax, tracks, rounds)
    else:
        title = _epsilon_band(ax, tracks, rounds)
    if refusals:
        rx, ry, _ = zip(*refusals, strict=True)
        ax.plot(rx, ry, ls="none", marker="x", ms=7, mew=2, color=COLORS["refused"], label="refused round (epsilon it would reach)")
    if budget is not None:
        ax.axhline(budget, color="#b71c1c", ls="--", lw=1.5, label=f"budget ε = {budget:g}")
    tops = [e for t in tracks.values() for _, e in t] + [y for _, y, _ in refusals] + ([budget] if budget is not None else [])
    ax.set_ylim(0, max([*tops, 1e-3]) * 1.08)
    ax.set_ylabel("epsilon (per site)")
    ax.set_title(title)
    _int_rounds(ax, rounds)
    n_labels = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_labels <= 16 else 2, frameon=False)
    return fig


def _epsilon_lines(ax: Axes, tracks: dict[str, list[tuple[int, float]]], rounds: list[int]) -> str:
    names = sorted(tracks)
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    for i, name in enumerate(names):
        carried = carry_forward(tracks[name], rounds)
        xs = [x for x, y in zip(rounds, carried, strict=True) if y is not None]
        ys = [y for y in carried if y is not None]
        ax.step([*xs, xs[-1] + 0.4], [*ys, ys[-1]], where="post", color=cmap(i % cmap.N), lw=1.4, label=mpl_text(name))
        ax.plot(*zip(*tracks[name], strict=True), ls="none", marker="o", ms=3, color=cmap(i % cmap.N))
    return "epsilon spent per site (step = unchanged between rounds it trained)"


def _epsilon_band(ax: Axes, tracks: dict[str, list[tuple[int, float]]], rounds: list[int]) -> str:
    names = sorted(tracks)
    mat = np.full((len(names), len(rounds)), np.nan)
    for i, name in enumerate(names):
        for j, v in enumerate(carry_forward(tracks[name], rounds)):
            if v is not None:
                mat[i, j] = v
    cols = [j for j in range(len(rounds)) if not np.all(np.isnan(mat[:, j]))]
    sub = mat[:, cols]
    sub = np.concatenate([sub, sub[:, -1:]], axis=1)  # the last round's value gets a visible width
    xs = [float(rounds[j]) for j in cols]
    xs.append(xs[-1] + 0.4)
    lo, med, hi = np.nanmin(sub, 0), np.nanmedian(sub, 0), np.nanmax(sub, 0)
    ax.fill_between(xs, lo, hi, step="post", alpha=0.25, color="#1565c0", label=f"min–max over {len(names)} sites")
    ax.step(xs, med, where="post", color="#1565c0", lw=1.6, label="median site")
    ax.step(xs, hi, where="post", color="#0d47a1", lw=1.0, ls=":", label="max site")
    return f"epsilon spent per site ({len(names)} sites: spread shown instead of one line each)"


def plot_bytes(rows: list[MetricsRow], summary: RunSummary | None) -> Figure | None:
    """Bytes per round (payload up, on the wire up, down) and the cumulative traffic."""
    fig, (ax1, ax2) = _figure(2)
    top = 0.0
    getters: tuple[tuple[str, Getter, str, float], ...] = (
        ("up (payload)", lambda r: r.bytes_up, "-o", 5.5), ("up (on the wire)", lambda r: r.wire_bytes_up, ":^", 3.5),
        ("down", lambda r: r.bytes_down, "--s", 3.0))
    for label, get, style, ms in getters:
        xs, ys = _series(rows, get)
        if xs:
            ax1.plot(xs, ys, style, ms=ms, label=label)
            top = max([top, *ys])
    if not ax1.lines:
        return None
    ax1.set_title("bytes per round (all sites)")
    ax1.yaxis.set_major_formatter(_byte_formatter())
    ax1.set_ylim(0, max(top, 1.0) * 1.1)
    ax1.legend(fontsize=8)
    cumulative: tuple[tuple[str, Getter, str], ...] = (("up (payload)", lambda r: r.bytes_up, "-"), ("down", lambda r: r.bytes_down, "--"))
    for label, get, style in cumulative:
        xs, ys = _series(rows, get)
        if xs:
            ax2.plot(xs, np.cumsum(ys), style, lw=2 if style == "-" else 1.5, marker="o" if len(xs) == 1 else None, label=label)
    ax2.yaxis.set_major_formatter(_byte_formatter())
    ax2.set_ylim(bottom=0)
    codec = summary.compression.codec if summary is not None else None
    overall = num(summary.compression.ratio_up) if summary is not None else None
    ratio = f", upload ratio {overall:.2f}x" if overall is not None else ""
    ax2.set_title(mpl_text(f"cumulative bytes (codec {clean(codec, 20) if codec else 'n/a'}{ratio})"))
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        _int_rounds(ax, [r.round for r in rows])
    return fig


def plot_participation(rows: list[MetricsRow]) -> Figure | None:
    """Stacked outcomes per round against the number sampled, and each round's wall time."""
    fig, (ax1, ax2) = _figure(2)
    xs = [r.round for r in rows]
    bottom = np.zeros(len(rows))
    drawn = False
    for key, get in _COUNTS:
        vals = np.array([num(get(r)) or 0.0 for r in rows])
        if vals.any() or key == "accepted":
            ax1.bar(xs, vals, bottom=bottom, color=COLORS[key], label=key.replace("_", " "), width=0.8)
            bottom += vals
            drawn = drawn or bool(vals.any())
    sx, sy = _series(rows, lambda r: r.sampled)
    if sx:
        ax1.plot(sx, sy, ls="none", marker="_", ms=14, mew=2, color="black", label="sampled")
        drawn = True
    ax1.set_title("sites per round")
    ax1.set_ylabel("sites")
    top = max([float(bottom.max()) if len(bottom) else 0.0, *sy])
    ax1.set_ylim(0, max(1.0, top) * 1.3)  # headroom for the legend above the bars
    ax1.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    _int_rounds(ax1, xs)
    tx, ty = _series(rows, lambda r: r.round_seconds)
    if tx:
        ax2.bar(tx, ty, color="#546e7a", width=0.8)
        ax2.set_title("round wall time (round 1 includes start-up)")
        ax2.set_ylabel("seconds")
        _int_rounds(ax2, tx)
    else:
        ax2.set_visible(False)
    return fig if drawn or tx else None


def plot_watermark(rows: list[MetricsRow], wm: WatermarkSummary | None) -> Figure | None:
    """The detection p-value after each round's embedding, and trigger-set accuracy before / after it."""
    xs, ps = _series(rows, lambda r: r.watermark.p_value if r.watermark else None)
    if not xs:
        return None
    fig, (ax1, ax2) = _figure(2)
    floor = 1e-300
    clipped = any(p < floor for p in ps)
    ax1.semilogy(xs, [max(p, floor) for p in ps], "-o", ms=3.5, color="#00695c", label="p-value after embedding")
    alpha = num(wm.alpha) if wm is not None else None
    if alpha is not None and alpha > 0:
        ax1.axhline(alpha, color="#b71c1c", ls="--", label=f"alpha = {alpha:g} (detected below)")
    ax1.set_title("watermark p-value (exact binomial, log scale)" + (" — 0 drawn at 1e-300" if clipped else ""), fontsize=10)
    ax1.set_ylabel("p-value")
    ax1.legend(fontsize=8)
    _int_rounds(ax1, xs)
    drawn = False
    accuracies: tuple[tuple[str, Getter, str], ...] = (
        ("before embedding", lambda r: r.watermark.trigger_accuracy_before if r.watermark else None, ":s"),
        ("after embedding", lambda r: r.watermark.trigger_accuracy if r.watermark else None, "-o"))
    for label, get, style in accuracies:
        tx, ty = _series(rows, get)
        if tx:
            ax2.plot(tx, ty, style, ms=3.5, label=label)
            drawn = True
    k = wm.num_classes if wm is not None else None
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


def plot_sparsity(rows: list[MetricsRow]) -> Figure | None:
    """Share of the global model's weights pruned, per round (left out when never above zero)."""
    xs, ys = _series(rows, lambda r: r.sparsity)
    if not any(y > 0 for y in ys):
        return None
    fig, (ax,) = _figure(1)
    ax.plot(xs, ys, "-o", ms=3.5, color="#4e342e")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of weights pruned")
    ax.set_title("model sparsity per round")
    _int_rounds(ax, xs)
    return fig


# ---------------------------------------------------------------------------- the page's figures
def draw(title: str, anchor: str, build: Callable[[], Figure | None], caption: str = "") -> PlotSection | None:
    """A figure's section; None when there is nothing to draw, a note (`error`) when drawing failed."""
    try:
        with matplotlib.rc_context({"text.usetex": False, "font.size": 9}):
            fig = build()
            uri = _png(fig) if fig is not None else None
    except Exception as exc:  # noqa: BLE001 - the report must not fail because one plot did
        return PlotSection(title, anchor, caption, error=f"{type(exc).__name__}: {clean(exc, 200)}")
    return PlotSection(title, anchor, caption, uri=uri) if uri is not None else None


def _epsilon_caption(data: RunData) -> str:
    caption = ("Each site's cumulative (epsilon, delta)-DP spend as reported with its accepted updates; a site that refuses "
               "a round because it would pass its budget is excluded from then on.")
    tracks, _ = epsilon_tracks(data.rows)
    finals = [t[-1][1] for t in tracks.values() if t]
    if len(finals) > 1 and max(finals) > 0 and (max(finals) - min(finals)) <= 0.02 * max(finals):
        caption += (f" The {len(finals)} sites' lines end within {max(finals) - min(finals):.3g} of each other, "
                    "so they overlap in the plot (see the table below for each site).")
    silent = sorted(known_sites(data) - set(tracks))
    if silent:
        shown = ", ".join(silent[:10]) + (f" and {len(silent) - 10} more" if len(silent) > 10 else "")
        caption += f" Not drawn: {len(silent)} site(s) with no accepted update, hence no reported epsilon ({shown})."
    return caption


def draw_plots(data: RunData) -> list[PlotSection]:
    """Every figure the run has data for, in page order (none without rounds)."""
    if not data.rows:
        return []
    rows, summary = data.rows, data.summary
    privacy = data.privacy
    wm = summary.watermark if summary is not None else None
    sections = [draw("Accuracy and loss", "accuracy", lambda: plot_accuracy(rows, summary),
                     "Central evaluation of the global model on the held-out test set after each round; train loss is the "
                     "example-weighted mean the accepted sites reported.")]
    if privacy.enabled:
        sections.append(draw("Privacy spent (epsilon per site)", "privacy", lambda: plot_epsilon(rows, privacy.budget),
                             _epsilon_caption(data)))
    sections += [
        draw("Communication", "bytes", lambda: plot_bytes(rows, summary),
             "Payload bytes of accepted uploads, the same on the wire (with framing), and the global model sent down to sampled sites."),
        draw("Participation", "participation", lambda: plot_participation(rows),
             "Stacked: accepted updates, updates rejected by validation, privacy refusals, failed replies and time-outs; "
             "the black tick is the number of sites sampled."),
        draw("Watermark", "watermark", lambda: plot_watermark(rows, wm),
             "Verification after each round's embedding: exact binomial test of trigger-set matches against chance (1/K)."),
        draw("Sparsity", "sparsity", lambda: plot_sparsity(rows), "Share of the global model's weights held at zero by the pruning mask."),
    ]
    return [s for s in sections if s is not None]
