"""Accuracy against cost, with the Pareto front: train time (and device-hours), latency at batch 1, VRAM on the card.

Validation is on the y axis: the front is a choice, and a front drawn through test scores would be one made on
test. Each plot marks the recommendation it belongs to (the best pick, and the pick for its cost within the
margin), the margin itself, and the user's budget on its axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from bench.report import tables
from bench.report.context import ReportData
from bench.report.plotkit import figure, legend_outside, log_x, plain, scatter, spread


@dataclass(frozen=True)
class Front:
    cost: str  # leaderboard column on the x axis
    scale: float  # divide the column by this for the axis
    xlabel: str
    title: str
    question: str  # the recommendation this cost answers (recommend.QUESTIONS)
    limit: str | None  # the budget field on this axis (recommend.LIMITS)
    what: str  # for the skip note
    numbered: bool = False  # number the front's points (the report's Pareto table spells them out)


TIME = Front("train_s_mean", 1.0, "train time (s, mean over seeds)",
             "Validation accuracy vs train time\n(circled and numbered: the Pareto front; its table gives test)",
             "cheapest", "max_train_hours", "train time", numbered=True)
LATENCY = Front("infer_latency_ms_p50", 1.0, "inference latency at batch 1 (ms, median)",
                "Validation accuracy vs inference latency\n(circled: the Pareto front)", "fastest", "max_latency_ms",
                "an inference latency (infer_bench)")
# VRAM as --max-vram judges it (`tables.MEMORY_AGGS`): what the cell's process held on the card, so the budget
# line and the points are the same figure.
VRAM = Front("vram_card_bytes", 2**30, "VRAM on the card (GiB: the cell's process, NVML)",
             "Validation accuracy vs VRAM on the card\n(circled: the Pareto front)", "smallest", "max_vram_bytes",
             "a VRAM figure (CPU runs record none)")
_PICK_WORDS = {"cheapest": "cheapest to train", "fastest": "fastest to serve", "smallest": "smallest"}


def draw(data: ReportData, spec: Front) -> Figure | str:
    g = data.leaderboard.dropna(subset=["val_mean", spec.cost])
    if len(g) < 2:
        return f"skipped: fewer than two configs with both validation accuracy and {spec.what}"
    g = g.assign(val_pct=100 * g["val_mean"], _x=g[spec.cost].astype(float) / spec.scale)
    fig, (ax,) = figure(9.5, 5.4)
    scatter(ax, data, g, "_x", "val_pct")
    front = tables.pareto_rows(g, cost="_x")
    x, y = front["_x"], front["val_pct"]
    ax.step(x, y, where="post", color="black", ls="--", lw=1.2, zorder=2, label="Pareto front")
    ax.scatter(x, y, s=260, facecolors="none", edgecolors="black", lw=1.4, zorder=4)
    if spec.numbered:  # numbers, not names: names collide
        for (px, py), numbers in front.groupby([x, y], sort=False)["front_no"]:
            ax.annotate(",".join(map(str, numbers)), (px, py), xytext=(9, 6), textcoords="offset points",
                        fontsize=10, fontweight="bold")
    _advice(ax, data, spec)
    if spread(g["_x"]):
        log_x(ax)
    ax.margins(x=0.08, y=0.08)
    ax.set(xlabel=spec.xlabel, ylabel="validation top-1 (%, mean over seeds)", title=spec.title)
    legend_outside(ax)
    return fig


def _advice(ax, data: ReportData, spec: Front) -> None:
    """The best pick (star), this axis's pick within the margin (diamond), the margin (dotted line), the budget."""
    advice = data.advice
    best = advice.best
    if best is not None:
        margin = 100 * best["val_mean"] - advice.budget.within_pts
        ax.axhline(margin, color="0.45", ls=":", lw=1.2, zorder=1,
                   label=f"{advice.budget.within_pts:g} pt below the best pick")
        picks = advice.picks.set_index("question")
        for key, marker, label in (("best", "*", "best pick"), (spec.question, "D", _PICK_WORDS[spec.question])):
            if key in picks.index and pd.notna(picks.at[key, spec.cost]):
                px = float(picks.at[key, spec.cost]) / spec.scale
                ax.scatter([px], [100 * picks.at[key, "val_mean"]], marker=marker, s=420 if marker == "*" else 200,
                           facecolors="none", edgecolors="crimson", lw=2, zorder=5, label=label)
    limit = getattr(advice.budget, spec.limit) if spec.limit else None
    if limit is not None:
        scale = spec.scale * (1 / 3600 if spec.limit == "max_train_hours" else 1)
        ax.axvline(limit / scale, color="crimson", ls="-.", lw=1.2, zorder=1, label="your budget")


def device_hours_label(data: ReportData) -> str:
    kinds = set(data.leaderboard["train_device"].dropna())
    return f"{kinds.pop()}-hours" if len(kinds) == 1 else "device-hours (GPU and CPU rows mixed)"


def accuracy_vs_time(data: ReportData) -> Figure | str:
    fig = draw(data, TIME)
    if isinstance(fig, Figure):
        # GPU-hours are train time on one device: a second scale on the same axis, not a second plot.
        top = fig.axes[0].secondary_xaxis("top", functions=(lambda s: s / 3600, lambda h: h * 3600))
        top.set_xlabel(f"{device_hours_label(data)} (train time x 1 device)")
        if fig.axes[0].get_xscale() == "log":
            plain(top.xaxis)
    return fig


def accuracy_vs_latency(data: ReportData) -> Figure | str:
    return draw(data, LATENCY)


def accuracy_vs_vram(data: ReportData) -> Figure | str:
    fig = draw(data, VRAM)
    shown = data.leaderboard.dropna(subset=["val_mean", VRAM.cost])
    older = int(shown["vram_allocator_fallback"].fillna(False).astype(bool).sum())
    if isinstance(fig, Figure) and older:  # rows from before the per-process figure: said, as in the tables
        fig.axes[0].set_xlabel(f"{VRAM.xlabel}\n{older} config(s) recorded before it: the allocator's training "
                               "peak (no CUDA context)")
    return fig
