"""Accuracy along the axes a suite varies: resolution, freeze depth, training-set size, and every other one.

Each point is the config validation chose for that model and value (over the other axes: `tables.best_per`),
drawn at its test accuracy, ±1 std over seeds; the titles say so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from bench.report import tables
from bench.report.context import ReportData
from bench.report.plotkit import (CHOSEN_TEST, figure, hue_order, legend_outside, log_x, seed_rows, spread,
                                  suptitle)

# Axes with a plot of their own; `accuracy_by_axis` draws the rest.
OWN_PLOT = ("resolution", "freeze", "train_subset")


def accuracy_vs_resolution(data: ReportData) -> Figure | str:
    values = sorted(data.leaderboard["resolution"].dropna().unique())
    if len(values) < 2:
        return f"skipped: one input resolution only ({', '.join(map(str, values)) or 'none'})"
    rows = seed_rows(data, tables.best_per(data.leaderboard, ["model", "resolution"]))
    if rows.empty:
        return "skipped: no config has validation accuracy to choose by"
    rows = rows.assign(resolution=rows["resolution"].astype(int))
    fig, (ax,) = figure(8, 4.8)
    sns.lineplot(rows, x="resolution", y="top1_pct", hue="model", hue_order=hue_order(data, rows), palette=data.palette,
                 marker="o", markersize=8, errorbar="sd", err_style="bars", err_kws={"capsize": 4}, ax=ax)
    ax.set_xticks([int(v) for v in values])
    ax.set(xlabel="input resolution (px)", ylabel=CHOSEN_TEST,
           title="Accuracy vs resolution\n(per point: the config validation chose; test, ±1 std over seeds)")
    legend_outside(ax, "model")
    return fig


def freeze_effect(data: ReportData) -> Figure | str:
    labels = data.leaderboard["freeze"].dropna().astype(str).unique()
    if len(labels) < 2:
        return f"skipped: one freeze depth only ({', '.join(labels) or 'none'})"
    order = sorted(labels, key=tables.freeze_key)
    rows = seed_rows(data, tables.best_per(data.leaderboard, ["model", "freeze"]))
    if rows.empty:
        return "skipped: no config has validation accuracy to choose by"
    rows = rows.assign(freeze=rows["freeze"].astype(str), train_s=rows["train_s"].astype(float))
    models = hue_order(data, rows)
    # seaborn 0.13 divides the dodge by (hue levels - 1): with one model, no dodge (nothing to dodge from).
    dodge = 0.25 if len(models) > 1 else False
    fig, axes = figure(12, 4.8, ncols=2)
    for ax, y, label in zip(axes, ("top1_pct", "train_s"), (CHOSEN_TEST, "train time (s)")):
        sns.pointplot(rows, x="freeze", y=y, hue="model", order=order, hue_order=models, palette=data.palette,
                      errorbar="sd", dodge=dodge, capsize=0.08, ax=ax, legend=ax is axes[-1])
        ax.set(xlabel="freeze depth (none = full fine-tune ... all = linear probe)", ylabel=label)
    axes[0].set_title("Accuracy by freeze depth (config chosen by validation)")
    axes[1].set_title("Train time by freeze depth (same configs)")
    legend_outside(axes[-1], "model")
    return fig


def chosen_along(data: ReportData, axis: str) -> pd.DataFrame:
    """Per model and value of `axis`, the config validation chose over the other axes (a tuned axis chooses
    among every config, the others among the leaderboard's rows, each at its own best tuned values)."""
    source = data.configs if axis in tables.TUNED else data.leaderboard
    return tables.best_per(source, ["model", axis]).dropna(subset=["top1_mean"])


def _panel(ax, data: ReportData, chosen: pd.DataFrame, axis: str, x: pd.Series | None = None) -> None:
    """Test top-1 ±1 std against `x` (numbers) or `axis`'s values in axis order, one line per model."""
    values = pd.to_numeric(chosen[axis] if x is None else x, errors="coerce")
    numeric = values.notna().all()
    if numeric:
        positions = values.astype(float)
    else:  # text values, or unset ones: evenly spaced, in axis order
        labels, order = tables.axis_labels(chosen[axis], axis)
        positions = labels.map({label: i for i, label in enumerate(order)}).astype(float)
        ax.set_xticks(range(len(order)), order, rotation=30 if max(map(len, order)) > 6 else 0)
    models = hue_order(data, chosen)
    width = 0.08 if not numeric else 0.0
    for i, model in enumerate(models):
        mine = chosen["model"].astype(str) == model
        offset = (i - (len(models) - 1) / 2) * width
        order_ = np.argsort(positions[mine].to_numpy(), kind="stable")
        px = positions[mine].to_numpy()[order_] + offset
        py = 100 * chosen.loc[mine, "top1_mean"].to_numpy(dtype=float)[order_]
        err = 100 * chosen.loc[mine, "top1_std"].fillna(0).to_numpy(dtype=float)[order_]
        ax.errorbar(px, py, yerr=err, color=data.palette.get(model), marker="o", ms=7, capsize=3, lw=1.6, label=model)
    if numeric and spread(positions):
        log_x(ax, base=2 if axis in ("batch_size", "train_subset", "resolution", "epochs") else 10)
    if numeric and positions.nunique() <= 8:  # few values: a tick at each, labelled as the suite wrote it
        ticks = sorted(positions.unique())
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()


def accuracy_vs_train_subset(data: ReportData) -> Figure | str:
    if "train_subset" not in data.axes:
        return "skipped: one training-set size only (vary train_subset to see how many labels you need)"
    chosen = chosen_along(data, "train_subset")
    if chosen.empty:
        return "skipped: no config has validation accuracy to choose by"
    # The images a config trained on: train_subset where set, else the whole training split.
    images = pd.to_numeric(chosen["train_images"], errors="coerce").fillna(pd.to_numeric(chosen["train_subset"], errors="coerce"))
    unknown = int(images.isna().sum())
    chosen, images = chosen[images.notna()], images[images.notna()]
    if chosen.empty:
        return "skipped: no config recorded how many training images it used"
    fig, (ax,) = figure(8.5, 4.8)
    _panel(ax, data, chosen, "train_subset", x=images)
    note = f"; {unknown} config(s) without a recorded size left out" if unknown else ""
    ax.set(xlabel="training images used (train_subset; the whole split where unset)", ylabel=CHOSEN_TEST,
           title=f"How many labels do I need?\n(per point: the config validation chose; test, ±1 std over seeds{note})")
    legend_outside(ax, "model")
    return fig


def accuracy_by_axis(data: ReportData) -> Figure | str:
    axes = [a for a in data.axes if a not in OWN_PLOT]
    if not axes:
        return "skipped: no axis varies beyond model, resolution, freeze depth and training-set size"
    panels = [(a, chosen_along(data, a)) for a in axes]
    panels = [(a, c) for a, c in panels if not c.empty]
    if not panels:
        return "skipped: no config has validation accuracy to choose by"
    # An axis each model ranked at one value only (weights files, one per model) shows no effect of its own.
    along = [(a, c) for a, c in panels if (c.groupby("model")[a].nunique(dropna=False) > 1).any()]
    if not along:
        return (f"skipped: {', '.join(a for a, _ in panels)} took one value per model among the ranked configs, "
                "so there is nothing to compare along it apart from the model")
    panels = along
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid = figure(4.6 * ncols + 1.8, 3.9 * nrows, ncols=ncols, nrows=nrows)
    for ax, (axis, chosen) in zip(grid, panels):
        _panel(ax, data, chosen, axis)
        ax.set(xlabel=axis, ylabel=CHOSEN_TEST if ax in grid[::ncols] else "", title=f"Accuracy by {axis}")
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    legend = {}
    for ax in grid[:len(panels)]:  # a model may be missing from a panel: the legend has every one once
        legend |= {name: handle for handle, name in zip(*ax.get_legend_handles_labels()) if name not in legend}
    fig.legend(list(legend.values()), list(legend), loc="outside right center", frameon=False, title="model")
    title = "Accuracy along the other axes that vary (per point: the config validation chose; test, ±1 std over seeds)"
    suptitle(fig, title)
    return fig
