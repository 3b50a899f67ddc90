"""The charts of the run report (pipelines/report.py), drawn with matplotlib as inline SVG.

Every function takes plain data (names, numbers, arrays) and returns an HTML ``<figure>`` holding one
``<svg>``: no file is written, and nothing here reads the run. Figures are made with
``matplotlib.figure.Figure``, not pyplot, so no global figure state and no GUI backend are involved.
Text from the run (step and subset names) goes through ``mpl_text``: matplotlib then draws it as
written (no mathtext), and its SVG writer escapes ``<``, ``>`` and ``&``.
"""

from __future__ import annotations

import io
import math
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

STATUS_COLOUR = {"complete": "#2e7d32", "running": "#1565c0", "failed": "#c62828", "not run yet": "#9e9e9e"}
OTHER_STATUS = "#616161"
POSITIVE, NEGATIVE, FALSE_NEGATIVE = "#2e7d32", "#ef6c00", "#c62828"
SERIES = ["#1565c0", "#ef6c00", "#2e7d32", "#8e24aa", "#00838f", "#c62828", "#6d4c41", "#f9a825"]
SCORE_BINS = 30
#: Fixed hash salt and no date: the same run gives the same bytes; text stays text (small, findable).
_RC = {"svg.hashsalt": "assay-report", "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 9}


def plot_settings() -> AbstractContextManager:
    """The matplotlib settings every chart of the report is drawn under."""
    import matplotlib

    return matplotlib.rc_context(_RC)


def steps_chart(names: list[str], seconds: list[float], statuses: list[str], labels: list[str]) -> str:
    """Horizontal bars: time per step, coloured by status, each labelled (duration or status)."""
    fig, ax = _figure(8, 0.8 + 0.32 * len(names))
    y = np.arange(len(names))
    ax.barh(y, seconds, color=[STATUS_COLOUR.get(s, OTHER_STATUS) for s in statuses])
    top = max([*seconds, 1e-9])
    for yi, t, label in zip(y, seconds, labels, strict=True):
        ax.text(t + top * 0.01, yi, mpl_text(label), va="center", fontsize=8)
    ax.set_yticks(y, [mpl_text(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("seconds")
    ax.set_title("time per step (colour: status)")
    return svg(fig)


def p_at_1_chart(
    series: list[tuple[str, list[float | None]]], groups: list[str], chance: dict[str, float], title: str
) -> str:
    """Grouped bars: P@1 per group (subsets, then "overall"), one bar per series (eval step or arm),
    with the chance level of each subset as a dashed line."""
    fig, ax = _figure(min(11.0, 3.0 + 0.45 * len(groups) * max(1, len(series)) ** 0.5), 3.6)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series):
        heights = [np.nan if v is None else float(v) for v in values]
        ax.bar(
            x - 0.4 + width * (i + 0.5), heights, width, label=mpl_text(label), color=SERIES[i % len(SERIES)]
        )
    if chance:
        for xi, group in zip(x, groups, strict=True):
            if group in chance:
                ax.hlines(
                    chance[group], xi - 0.45, xi + 0.45, colors="black", linestyles="dashed", linewidth=1
                )
        ax.plot([], [], color="black", linestyle="dashed", linewidth=1, label="chance")
    _group_ticks(ax, x, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("P@1")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    return svg(fig)


def loss_chart(name: str, steps: list[int], losses: list[float]) -> str:
    """Loss vs step, raw and smoothed."""
    step, loss = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    # Exponential moving average, debiased as TensorBoard does; heavier the longer the run.
    w = min(0.95, max(0.0, 1.0 - 10.0 / len(loss)))
    fig, ax = _figure(5.2, 2.8)
    if w > 0:
        smooth, acc = np.empty_like(loss), 0.0
        for i, v in enumerate(loss):
            acc = w * acc + (1 - w) * v
            smooth[i] = acc / (1 - w ** (i + 1))
        ax.plot(step, loss, color=SERIES[0], alpha=0.35, linewidth=1, label="raw")
        ax.plot(step, smooth, color=SERIES[0], linewidth=2, label=f"smoothed (EMA {w:.2f})")
    else:  # too few points to smooth
        ax.plot(step, loss, color=SERIES[0], linewidth=1.5, marker="o", markersize=3, label="raw")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(mpl_text(f"{name}: training loss"))
    ax.legend(fontsize=8)
    return svg(fig)


def score_histograms(
    name: str,
    subsets: list[str],
    scores: dict[str, dict[str, np.ndarray]],
    positive_stats: dict[str, dict[str, float]],
) -> str:
    """Per subset, the share of positives and of mined negatives per cosine-score bin.

    ``scores[subset]`` holds "positive" and "negative" arrays; a subset without positive scores is
    drawn with the percentiles in ``positive_stats[subset]`` (p10, p50, p90; from the mine manifest).
    """
    empty = np.empty(0)
    every = [a for sub in subsets for a in scores.get(sub, {}).values()]
    every += [np.array([st[k] for k in ("p10", "p90") if k in st]) for st in positive_stats.values()]
    both = np.concatenate(every) if every else empty
    # One set of bins for every subset: the panels share their x axis and compare at a glance.
    edges = np.histogram_bin_edges(both, bins=SCORE_BINS) if both.size else np.linspace(0, 1, SCORE_BINS + 1)
    fig, axes = _grid(len(subsets), f"{name}: positive vs mined negative scores", "cosine score")
    for ax, sub in zip(axes, subsets, strict=True):
        pos, neg = scores.get(sub, {}).get("positive", empty), scores.get(sub, {}).get("negative", empty)
        for values, colour, label in ((neg, NEGATIVE, "mined negatives"), (pos, POSITIVE, "positives")):
            if values.size:
                counts, _ = np.histogram(values, bins=edges)
                ax.stairs(counts / values.size, edges, fill=True, alpha=0.55, color=colour, label=label)
        stats, n_pos = positive_stats.get(sub) or {}, pos.size
        if not pos.size and {"p10", "p50", "p90"} <= stats.keys():
            ax.axvspan(
                stats["p10"], stats["p90"], color=POSITIVE, alpha=0.15, label="positives p10–p90 (manifest)"
            )
            ax.axvline(stats["p50"], color=POSITIVE, linewidth=2, label="positives median (manifest)")
            n_pos = int(stats.get("n", 0))
        _panel_title(ax, sub, f"{n_pos} positives · {neg.size} negatives")
    _grid_legend(fig)
    return svg(fig)


#: The groups of ``p_yes_histograms_chart``: (key in the histogram, colour, legend label, count word).
GOLD_GROUPS = (
    ("candidate", NEGATIVE, "candidates", "candidates"),
    ("positive", POSITIVE, "positives", "positives"),
)
#: Candidates split by a truth (``curation.judge.quality``'s ``p_yes_hist``).
TRUTH_GROUPS = (
    ("no_match", NEGATIVE, "candidates that do not match", "no match"),
    ("match", FALSE_NEGATIVE, "candidates that match (real false negatives)", "match"),
)


def p_yes_histograms_chart(
    name: str,
    subsets: list[str],
    hist: dict[str, dict[str, list[int]]],
    groups: tuple[tuple[str, str, str, str], ...] = GOLD_GROUPS,
    title: str = "judge p_yes, positives vs candidates",
) -> str:
    """Per subset, the share of each group per p_yes bin; ``hist`` holds bin counts over [0, 1] per
    group: ``curation.judge.stage.p_yes_histograms``' (positives vs candidates, ``GOLD_GROUPS``) or
    the quality's ``p_yes_hist`` (candidates by the truth, ``TRUTH_GROUPS``)."""
    fig, axes = _grid(len(subsets), f"{name}: {title}", "judge p_yes")
    for ax, sub in zip(axes, subsets, strict=True):
        n = []
        for group, colour, label, word in groups:
            counts = np.asarray(hist.get(sub, {}).get(group) or [], dtype=np.float64)
            n.append(f"{int(counts.sum())} {word}")
            if counts.sum():
                edges = np.linspace(0.0, 1.0, len(counts) + 1)
                ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.55, color=colour, label=label)
        ax.set_xlim(0, 1)
        _panel_title(ax, sub, " · ".join(reversed(n)))
    _grid_legend(fig)
    return svg(fig)


def false_negative_chart(name: str, subsets: list[str], rates: dict[str, tuple[int, int]]) -> str:
    """Bars: false negatives as % of judged non-gold pairs, per subset, labelled "fn/judged"."""
    fig, ax = _figure(min(11.0, 3.5 + 0.55 * len(subsets)), 3.0)
    x = np.arange(len(subsets))
    values = [100.0 * rates[s][0] / rates[s][1] for s in subsets]
    ax.bar(x, values, 0.6, color=FALSE_NEGATIVE)
    for xi, s, v in zip(x, subsets, values, strict=True):
        ax.text(xi, v, f"{rates[s][0]}/{rates[s][1]}", ha="center", va="bottom", fontsize=7)
    _group_ticks(ax, x, [s or "(no subset)" for s in subsets])
    ax.set_ylim(0, max([*values, 1.0]) * 1.2)
    ax.set_ylabel("false negatives (%)")
    ax.set_title(mpl_text(f"{name}: false-negative rate per subset"))
    return svg(fig)


def svg(fig: Any) -> str:
    """The figure as an inline ``<svg>`` in a ``<figure>`` (no XML prolog, no date)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return '<figure class="plot">' + text[text.index("<svg") :] + "</figure>\n"


def mpl_text(text: str) -> str:
    """Text for matplotlib, drawn as written: no mathtext ($), no legend-hiding leading underscore."""
    text = str(text).replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _grid(n: int, title: str, xlabel: str) -> tuple[Any, list[Any]]:
    """Small multiples, 4 per row, sharing the x axis, with one legend for all (``_grid_legend``).
    No layout engine: fixed margins draw a 36-subset grid in half the time."""
    from matplotlib.figure import Figure

    cols = min(4, n)
    rows = math.ceil(n / cols)
    width, height = max(7.0, 2.8 * cols), 2.1 * rows + 1.3
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.tick_params(labelsize=7, labelbottom=True)
    for ax in axes[:n][-cols:]:
        ax.set_xlabel(xlabel)
    for ax in axes[:n:cols]:
        ax.set_ylabel("share of group")
    fig.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.15 / width,
        top=1 - 1.05 / height,  # room for the title line and the legend line
        bottom=0.55 / height,
        hspace=0.6,
        wspace=0.25,
    )
    fig.suptitle(mpl_text(title), x=0.55 / width, y=1 - 0.1 / height, ha="left", va="top")
    return fig, axes[:n]


def _grid_legend(fig: Any) -> None:
    """One legend for a grid: every label of its panels, once, on the line under the title."""
    labels: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    if labels:
        width, height = fig.get_size_inches()
        fig.legend(
            labels.values(),
            labels.keys(),
            loc="upper left",
            bbox_to_anchor=(0.45 / width, 1 - 0.32 / height),
            ncols=len(labels) if width >= 9 else 2,
            frameon=False,
            fontsize=8,
        )


def _panel_title(ax: Any, subset: str, counts: str) -> None:
    name = subset or "(no subset)"
    name = name if len(name) <= 38 else name[:37] + "…"  # the tables hold the full names
    ax.set_title(mpl_text(f"{name}\n{counts}"), fontsize=8)


def _group_ticks(ax: Any, x: np.ndarray, labels: list[str]) -> None:
    rotate = len(labels) > 6 or max(len(s) for s in labels) > 14
    short = [s if len(s) <= 32 else s[:31] + "…" for s in labels]  # the tables hold the full names
    ax.set_xticks(
        x, [mpl_text(s) for s in short], rotation=35 if rotate else 0, ha="right" if rotate else "center"
    )
