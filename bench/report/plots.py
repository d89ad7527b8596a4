"""The report's plots (seaborn): the registry, and the plots of memory, training curves, a race's curves and the
confusion matrix.

Each plot takes the `ReportData` and returns a Figure, or a note saying why it was skipped. A plot that shows
one config per point chooses it by validation (`tables.best_per`) and draws its test accuracy; the axis labels
and titles say so. A plot that raises is one line in the report (which plot, and the exception), never the end of
the report; the other plots and sections are still written.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from bench.report import along, fronts, perclass, race
from bench.report.context import ReportData
from bench.report.plotkit import PNG_DPI, RC, figure, hue_order, legend_outside, png

__all__ = ["OPTIONAL_PLOTS", "PLOTS", "PNG_DPI", "Plot", "PlotSpec", "make_plots"]
MAX_CURVES = 8  # more lines than this in one panel stop being readable


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    png: bytes | None  # None: skipped, `note` says why
    note: str = ""
    failed: bool = False  # the plot raised: `note` names the exception (a bug to report, not a data shape)


def vram_vs_batch(data: ReportData) -> Figure | str:
    rows = data.current[data.current["status"] == "ok"].dropna(subset=["peak_vram_allocated_bytes", "batch_size"])
    if rows.empty:
        return "skipped: no peak VRAM recorded (CPU-only runs?)"
    sizes = sorted(rows["batch_size"].unique())
    if len(sizes) < 2:
        return f"skipped: one batch size only ({sizes[0]})"
    rows = rows.assign(vram_gib=rows["peak_vram_allocated_bytes"].astype(float) / 2**30,
                       batch_size=rows["batch_size"].astype(int), resolution="r" + rows["resolution"].astype(str))
    style = "resolution" if rows["resolution"].nunique() > 1 else None
    order = sorted(rows["resolution"].unique(), key=lambda s: int(s[1:]) if s[1:].isdigit() else 0)
    fig, (ax,) = figure(8, 4.8)
    sns.lineplot(rows, x="batch_size", y="vram_gib", hue="model", hue_order=hue_order(data, rows), style=style,
                 style_order=order if style else None, palette=data.palette, estimator="max", errorbar=None,
                 markers=True, markersize=8, ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(s) for s in sizes])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="batch size", ylabel="peak VRAM allocated (GiB)", ylim=(0, None),
           title="Peak VRAM vs batch size (max over other settings)")
    legend_outside(ax)
    return fig


CURVE_METRICS = {"train_loss": "train loss", "val_loss": "validation loss", "val_top1": "validation top-1 (%)"}


def _curve_rows(data: ReportData) -> tuple[pd.DataFrame, list[str], int]:
    top = data.leaderboard.dropna(subset=["val_mean"]).head(MAX_CURVES)
    cells = data.trained[["suite", "run_id", "cell_id", "group_id", "model"]].merge(top[["suite", "group_id", "label"]])
    rows = data.epochs.merge(cells, on=["suite", "run_id", "cell_id"]) if not data.epochs.empty else data.epochs
    metrics = [m for m in CURVE_METRICS if m in rows and pd.to_numeric(rows[m], errors="coerce").notna().any()]
    return rows, metrics, len(data.leaderboard)


def training_curves(data: ReportData) -> Figure | str:
    rows, metrics, total = _curve_rows(data)
    if rows.empty or not metrics:
        return "skipped: no per-epoch metrics recorded for the shown cells"
    if rows.groupby(["suite", "run_id", "cell_id"])["epoch"].nunique().max() < 2:
        return "skipped: every shown cell ran a single epoch, so there is no curve to draw"
    fig, axes = figure(4.8 * len(metrics), 4.4, ncols=len(metrics))
    labels = list(dict.fromkeys(rows.sort_values("label")["label"]))
    labels = [lb for lb in data.leaderboard["label"] if lb in labels]  # legend in leaderboard order
    dashes = {}
    for label in labels:
        sub = rows[rows["label"] == label]
        model = str(sub["model"].iloc[0])
        k = dashes[model] = dashes.get(model, -1) + 1  # same model, same colour: tell its configs apart by line and marker
        style, marker = ["-", "--", ":", "-."][k % 4], "osD^vPX*"[k % 8]
        for ax, metric in zip(axes, metrics):
            scale = 100 if metric == "val_top1" else 1
            stats = sub.groupby("epoch")[metric].agg(["mean", "std"]).astype(float) * scale
            ax.plot(stats.index, stats["mean"], ls=style, marker=marker, ms=5, color=data.palette[model], label=label)
            ax.fill_between(stats.index, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                            color=data.palette[model], alpha=0.12, lw=0)
    for ax, metric in zip(axes, metrics):
        ax.set(xlabel="epoch", ylabel=CURVE_METRICS[metric], title=CURVE_METRICS[metric])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, frameon=False,
               title=f"the first {len(labels)} of {total} leaderboard rows, by validation (mean over seeds, band ±1 std)")
    return fig


def confusion_matrix(data: ReportData) -> Figure | str:
    """The recommended config (the best pick; #1 when nothing meets the budget), its seeds' matrices summed."""
    found = perclass.classes(data)
    if isinstance(found, str):
        return f"skipped: {found}"
    matrix, names, n = found.matrix, found.names, len(found.matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0) * 100
    side = min(max(6.0, 0.55 * n + 3), 16.0)
    fig, (ax,) = figure(side + 1.2, side)
    ticks = names if n <= 50 else False
    sns.heatmap(share, annot=n <= 15, fmt=".0f", cmap="Blues", vmin=0, vmax=100, square=True, xticklabels=ticks,
                yticklabels=ticks, cbar_kws={"label": "% of the true class", "shrink": 0.8}, ax=ax)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set(xlabel="predicted class", ylabel="true class")
    pooled = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
    title = (f"Chosen by validation ({found.why}): {found.config['label']}; test set, {found.seeds} seed(s) summed "
             f"(test top-1 {100 * pooled:.2f}%)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)))
    return fig


MAX_NAMED = 12  # dropped configs named one by one in the race plot's legend; beyond, one entry stands for them


def race_curves(data: ReportData) -> Figure | str:
    """Every raced config's validation top-1 against epochs trained: finished ones solid, dropped ones faded and
    ending in a cross at the rung that cut them; one panel per raced suite, the rungs dashed."""
    found = race.races(data)
    epochs = data.epochs
    if not found or epochs.empty or "val_top1" not in epochs or epochs["val_top1"].isna().all():
        return "skipped: no per-epoch validation top-1 recorded for the raced cells"
    fig, axes = figure(10, 5.2 * len(found), nrows=len(found))
    for ax, r in zip(axes, found):
        cells = data.current[(data.current["suite"] == r.suite) & data.current["race_rung"].notna()]
        rows = epochs.merge(cells[["suite", "run_id", "cell_id", "group_id"]], on=["suite", "run_id", "cell_id"])
        handles = _race_lines(ax, data, r, rows)
        _rung_lines(ax, r)
        ax.set(xlabel="epochs trained", ylabel="validation top-1 (%)",
               title=f"{r.suite}: {len(r.racers)} configs raced, {r.count(race.DROPPED)} dropped")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="mean over seeds")
    return fig


def _race_lines(ax, data: ReportData, r: race.Race, rows: pd.DataFrame) -> list:
    """One line per config (its curve's tuned values, mean over seeds), dropped ones first so that the finished
    ones lie on top; returns the legend's handles in the race table's order."""
    # One model's configs share its colour and differ in dashes, given in the table's order: finished ones solid.
    style = r.racers.groupby("model", sort=False).cumcount()
    named = len(r.racers) - r.count(race.FINISHED) <= MAX_NAMED
    handles, finished = {}, r.racers["outcome"] == race.FINISHED
    for i in [*r.racers.index[~finished][::-1], *r.racers.index[finished]]:
        racer = r.racers.loc[i]
        curve = rows[rows["group_id"] == racer["curve"]].groupby("epoch")["val_top1"].mean().dropna() * 100
        if curve.empty:
            continue
        x, colour = curve.index.to_numpy() + 1, data.palette.get(racer["model"], "0.4")  # epoch 0 ends after 1 epoch
        dashes = ["-", "--", "-.", ":"][style[i] % 4]
        if racer["outcome"] == race.FINISHED:
            rank = f"#{racer['rank']} " if pd.notna(racer["rank"]) else ""
            (handles[i],) = ax.plot(x, curve, color=colour, lw=2.2, ls=dashes, marker="o", ms=4,
                                    zorder=3, label=_wrap(f"{rank}{racer['label']}"))
        else:
            why = _race_outcome(racer)
            (handles[i],) = ax.plot(x, curve, color=colour, lw=1.2, alpha=0.4, marker="X", ms=8, markevery=[len(x) - 1],
                                    ls=dashes, label=_wrap(f"{racer['label']} ({why})"))
    if named:
        return [handles[i] for i in r.racers.index if i in handles]
    proxy = ax.plot([], [], color="0.45", alpha=0.5, lw=1.2, marker="X", ms=8, label="dropped (faded; × where cut)")
    return [handles[i] for i in r.racers.index[finished] if i in handles] + proxy


def _wrap(label: str) -> str:
    """Long config names on a few lines: a legend one line each would squeeze the axes to a sliver."""
    return "\n".join(textwrap.wrap(label, 48, subsequent_indent="  "))


def _race_outcome(racer: pd.Series) -> str:
    return f"dropped at rung {int(racer['rung']) + 1}" if racer["outcome"] == race.DROPPED else "failed"


def _rung_lines(ax, r: race.Race) -> None:
    for k, epochs in enumerate(r.rungs):
        if epochs is not None:
            ax.axvline(epochs, color="0.4", ls="--", lw=1, zorder=1)
            ax.text(epochs, 0.99, f" rung {k + 1}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                    fontsize=9, color="0.3")


@dataclass(frozen=True)
class PlotSpec:
    title: str
    draw: Callable[[ReportData], Figure | str]
    section: str = "plots"  # the report section that shows it


# The plot registry: key (also the PNG's file name) -> spec. Order is the report's order within a section.
PLOTS: dict[str, PlotSpec] = {
    "accuracy_vs_train_time": PlotSpec("Accuracy vs train time and device-hours, Pareto front", fronts.accuracy_vs_time),
    "accuracy_vs_latency": PlotSpec("Accuracy vs inference latency, Pareto front", fronts.accuracy_vs_latency),
    "accuracy_vs_vram": PlotSpec("Accuracy vs VRAM on the card, Pareto front", fronts.accuracy_vs_vram),
    "accuracy_vs_train_subset": PlotSpec("Accuracy vs training-set size", along.accuracy_vs_train_subset),
    "accuracy_vs_resolution": PlotSpec("Accuracy vs resolution", along.accuracy_vs_resolution),
    "freeze_depth": PlotSpec("Effect of freeze depth", along.freeze_effect),
    "accuracy_by_axis": PlotSpec("Accuracy along every other axis", along.accuracy_by_axis),
    "vram_vs_batch_size": PlotSpec("Peak VRAM vs batch size", vram_vs_batch),
    "training_curves": PlotSpec("Training and validation curves", training_curves),
    "confusion_matrix": PlotSpec("Confusion matrix of the recommended config", confusion_matrix, "per_class"),
}


# Plots of a section that only some results have (the race's): a report without one neither draws nor mentions
# them, unlike PLOTS, which every report draws or says why not.
OPTIONAL_PLOTS: dict[str, PlotSpec] = {
    "race_curves": PlotSpec("Validation top-1 against epochs, every raced config", race_curves, "race"),
}


def draw_plot(data: ReportData, key: str, spec: PlotSpec) -> Plot:
    """One plot as a PNG, or a note: why there was nothing to draw, or which exception stopped it."""
    try:
        with mpl.rc_context(RC):
            fig = spec.draw(data)
            if isinstance(fig, str):
                return Plot(key, spec.title, None, fig)
            return Plot(key, spec.title, png(fig))
    except Exception as exc:  # one plot must not take the report down: the note names the error, build lists it
        message = " ".join(str(exc).split())[:300]
        return Plot(key, spec.title, None, f"plot {key} skipped: {type(exc).__name__}: {message}", failed=True)


def make_plots(data: ReportData, section: str = "plots") -> list[Plot]:
    """Draw every registered plot of `section`; a plot with nothing to show becomes a note, never an empty figure."""
    return [draw_plot(data, key, spec) for key, spec in {**PLOTS, **OPTIONAL_PLOTS}.items() if spec.section == section]
