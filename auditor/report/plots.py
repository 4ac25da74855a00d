"""The report's plots: matplotlib figures (object API, no pyplot state, Agg/SVG canvas) returned as inline SVG text.

Every plot is drawn from counts (histogram bins, per-shard and per-length tallies), never from rows. No user text
(captions, file names) is drawn, so nothing from the data reaches the SVG markup. matplotlib and numpy only.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from auditor import histogram

# Text stays text (the browser draws it, and a test can read it); fixed ids keep two renders byte-identical.
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "auditor-report", "font.size": 9, "savefig.dpi": 110}
AUDIT_COLOR = "#3b6ea8"
REFERENCE_COLOR = "#6a9f58"
FLAG_COLOR = "#c0392b"
GREY = "#9aa5b1"


def figure_to_svg(fig: Figure) -> str:
    """The figure as an <svg> element (no XML prolog or doctype), to inline in HTML."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def svg_plot(draw: Callable[..., str]) -> Callable[..., str]:
    """Run a plot function under the report's rcParams (read when artists are made, so around all of it)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> str:
        with matplotlib.rc_context(SVG_STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _new_figure(width_in: float, height_in: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, which="major", color="#e6e9ed", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _plain_log_axis(axis, subs: tuple[float, ...] = (1.0,)) -> None:
    """Ticks at 1, 2, 5 x 10^k (or decades) written as plain numbers ("0.2", "1,000"), not "2x10^-1"."""
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _nonzero_range(*counts: Sequence[int]) -> tuple[int, int] | None:
    """First and last inner bin (indices into EDGES' intervals) holding any count of any histogram."""
    inner = np.sum([np.asarray(c[1:-1]) for c in counts if c is not None], axis=0)
    nonzero = np.flatnonzero(inner)
    if len(nonzero) == 0:
        return None
    return max(0, int(nonzero[0]) - 2), min(len(inner) - 1, int(nonzero[-1]) + 2)


def _draw_bins(ax, counts: Sequence[int], span: tuple[int, int], color: str, label: str) -> None:
    low, high = span
    edges = histogram.EDGES[low : high + 2]
    values = np.asarray(counts[1:-1][low : high + 1], dtype=float)
    ax.bar(edges[:-1], values, width=np.diff(edges), align="edge", color=color, label=label, log=True)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0.7)
    _plain_log_axis(ax.xaxis, subs=(1.0, 2.0, 5.0))
    _plain_log_axis(ax.yaxis)


def _draw_threshold(ax, threshold: float | None, label: str = "threshold") -> None:
    if threshold is None:
        return
    ax.axvline(threshold, color=FLAG_COLOR, linestyle="--", linewidth=1.4, label=f"{label} {threshold:.4f}")


@svg_plot
def plot_score_histogram(
    counts: Sequence[int],
    threshold: float | None,
    reference_counts: Sequence[int] | None = None,
    reference_label: str = "calibration reference",
    threshold_label: str = "threshold",
    score_label: str = "score (first-step noise magnitude, log scale)",
) -> str:
    """Rows per score bin (log count axis) with the threshold; the reference set's bins in a second panel."""
    span = _nonzero_range(counts, reference_counts)
    panels = 2 if reference_counts is not None else 1
    fig, axes = _new_figure(4.6 * panels + 0.8, 3.2, panels)
    if span is None:
        axes[0].text(0.5, 0.5, "no scored rows", ha="center", va="center", transform=axes[0].transAxes)
        return figure_to_svg(fig)
    _draw_bins(axes[0], counts, span, AUDIT_COLOR, "this audit")
    axes[0].set_title(f"this audit: {int(sum(counts)):,} scored rows", loc="left")
    axes[0].set_ylabel("rows (log scale)")
    if reference_counts is not None:
        _draw_bins(axes[1], reference_counts, span, REFERENCE_COLOR, reference_label)
        axes[1].set_title(f"{reference_label}: {int(sum(reference_counts)):,} captions", loc="left")
        axes[1].set_ylabel("captions (log scale)")
        axes[1].set_xlim(axes[0].get_xlim())
    for ax in axes:
        _draw_threshold(ax, threshold, threshold_label)
        ax.set_xlabel(score_label)
        if threshold is not None:
            ax.legend(loc="upper right", frameon=False)
    return figure_to_svg(fig)


@svg_plot
def plot_shard_rates(rates: Sequence[float]) -> str:
    """Flagged rate of every input file, sorted from the highest: where the flags concentrate."""
    values = np.sort(np.asarray(rates, dtype=float))[::-1] * 100
    fig, (ax,) = _new_figure(7.0, 2.8)
    ax.bar(np.arange(1, len(values) + 1), values, width=1.0, color=FLAG_COLOR, alpha=0.8)
    ax.set_xlabel(f"input files ({len(values):,}), sorted by flagged rate")
    ax.set_ylabel("flagged rows (%)")
    ax.set_xlim(0.5, len(values) + 0.5)
    return figure_to_svg(fig)


@svg_plot
def plot_token_lengths(rows: Sequence[int], flagged: Sequence[int]) -> str:
    """Rows per caption length in tokens (bars, log axis) and the flagged rate at each length (line)."""
    rows_arr = np.asarray(rows, dtype=float)
    flagged_arr = np.zeros_like(rows_arr)
    flagged_arr[: len(flagged)] = np.asarray(flagged, dtype=float)[: len(rows_arr)]
    lengths = np.flatnonzero(rows_arr)
    fig, (ax,) = _new_figure(7.0, 3.0)
    if len(lengths) == 0:
        ax.text(0.5, 0.5, "no token counts", ha="center", va="center", transform=ax.transAxes)
        return figure_to_svg(fig)
    counts = rows_arr[lengths]
    # A log axis only where the counts span more than ~2 decades; within one it shows a single tick.
    log = counts.max() > 100 * counts.min()
    ax.bar(lengths, counts, width=0.85, color=GREY, log=log, label="rows")
    ax.set_xlabel("caption length (tokens, without BOS/EOS)")
    ax.set_ylabel("rows (log scale)" if log else "rows")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        _plain_log_axis(ax.yaxis)
    rate_ax = ax.twinx()
    rate_ax.spines[["top"]].set_visible(False)
    rate = 100 * flagged_arr[lengths] / rows_arr[lengths]
    rate_ax.plot(
        lengths, rate, color=FLAG_COLOR, marker="o", markersize=3, linewidth=1.2, label="flagged rate"
    )
    rate_ax.set_ylabel("flagged rate (%)", color=FLAG_COLOR)
    rate_ax.tick_params(axis="y", colors=FLAG_COLOR)
    rate_ax.set_ylim(bottom=0)
    return figure_to_svg(fig)


@svg_plot
def plot_score_shift(counts: np.ndarray, threshold: float | None, threshold_other: float | None) -> str:
    """Rows by (score in the other audit, score in this one) on log-log axes, the diagonal and both thresholds."""
    n = histogram.N_COUNTS
    inner = np.asarray(counts)[1 : n - 1, 1 : n - 1]
    fig, (ax,) = _new_figure(4.8, 4.2)
    span = _nonzero_range(
        np.concatenate([[0], inner.sum(axis=0), [0]]), np.concatenate([[0], inner.sum(axis=1), [0]])
    )
    if span is None:
        ax.text(0.5, 0.5, "no rows scored in both", ha="center", va="center", transform=ax.transAxes)
        return figure_to_svg(fig)
    low, high = span
    edges = histogram.EDGES[low : high + 2]
    grid = inner[low : high + 1, low : high + 1].astype(float)
    grid[grid == 0] = np.nan
    # Rasterized: one embedded PNG instead of a vector path per cell (~400 KB of SVG for the full grid).
    mesh = ax.pcolormesh(
        edges,
        edges,
        grid.T,
        norm=LogNorm(vmin=1, vmax=max(1, np.nanmax(grid))),
        cmap="viridis",
        rasterized=True,
    )
    colorbar = fig.colorbar(mesh, ax=ax, label="rows")
    colorbar.solids.set_rasterized(True)
    _plain_log_axis(colorbar.ax.yaxis)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.plot([edges[0], edges[-1]], [edges[0], edges[-1]], color="#555", linewidth=0.8, linestyle=":")
    if threshold_other is not None:
        ax.axvline(threshold_other, color=GREY, linestyle="--", linewidth=1.2)
    if threshold is not None:
        ax.axhline(threshold, color=FLAG_COLOR, linestyle="--", linewidth=1.2)
    _plain_log_axis(ax.xaxis, subs=(1.0, 2.0, 5.0))
    _plain_log_axis(ax.yaxis, subs=(1.0, 2.0, 5.0))
    ax.set_xlabel("score in the --against audit")
    ax.set_ylabel("score in this audit")
    ax.grid(False)
    return figure_to_svg(fig)
