"""The report's plots (seaborn). Each takes the `ReportData` and returns a Figure, or a note saying why it was skipped.

A plot that shows one config per point chooses it by validation (`tables.best_per`) and draws its test accuracy;
the axis labels and titles say so.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly: no pyplot state,
no GUI backend, nothing that depends on (or changes) the caller's matplotlib backend.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from bench.report import tables
from bench.report.context import ReportData

PNG_DPI = 150
MAX_CURVES = 8  # more lines than this in one panel stop being readable
# Large enough to read in print at the width of a page; the PNGs are saved at 150 dpi.
# Model names and labels are data, not TeX: a '$' in one must not switch matplotlib into math mode.
_RC = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=1.05), "legend.fontsize": 10,
       "text.parse_math": False}


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    png: bytes | None  # None: skipped, `note` says why
    note: str = ""


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, ncols, squeeze=False)[0])


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor="white")
    return buf.getvalue()


def _legend_outside(ax, title: str | None = None) -> None:
    """Legends go right of the axes: inside they cover points sooner or later."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title=title)


def _hue_order(data: ReportData, rows: pd.DataFrame) -> list[str]:
    present = set(rows["model"].astype(str))
    return [m for m in data.palette if m in present]


def _seed_rows(data: ReportData, groups: pd.DataFrame) -> pd.DataFrame:
    """The per-seed rows of the chosen configs, top1 in percent: seaborn draws the spread across seeds."""
    keys = groups[["suite", "group_id"]]
    rows = data.trained.merge(keys, on=["suite", "group_id"])
    return rows.assign(top1_pct=100 * rows["top1"])


CHOSEN_TEST = "test top-1 (%) of the config\nvalidation chose"


def accuracy_vs_resolution(data: ReportData) -> Figure | str:
    values = sorted(data.leaderboard["resolution"].dropna().unique())
    if len(values) < 2:
        return f"skipped: one input resolution only ({', '.join(map(str, values)) or 'none'})"
    rows = _seed_rows(data, tables.best_per(data.leaderboard, ["model", "resolution"]))
    if rows.empty:
        return "skipped: no config has validation accuracy to choose by"
    rows = rows.assign(resolution=rows["resolution"].astype(int))
    fig, (ax,) = _figure(8, 4.8)
    sns.lineplot(rows, x="resolution", y="top1_pct", hue="model", hue_order=_hue_order(data, rows), palette=data.palette,
                 marker="o", markersize=8, errorbar="sd", err_style="bars", err_kws={"capsize": 4}, ax=ax)
    ax.set_xticks([int(v) for v in values])
    ax.set(xlabel="input resolution (px)", ylabel=CHOSEN_TEST,
           title="Accuracy vs resolution\n(per point: the config validation chose; test, ±1 std over seeds)")
    _legend_outside(ax, "model")
    return fig


def accuracy_vs_time(data: ReportData) -> Figure | str:
    # Validation on the y axis: the front is a choice, and a front drawn through test scores would be one made
    # on test. The report's Pareto table gives the test accuracy of each point on it.
    g = data.leaderboard.dropna(subset=["val_mean", "train_s_mean"])
    if len(g) < 2:
        return "skipped: fewer than two configs with both validation accuracy and train time"
    g = g.assign(val_pct=100 * g["val_mean"], train_s=g["train_s_mean"].astype(float))
    front = tables.pareto_rows(data.leaderboard)
    fig, (ax,) = _figure(9, 5.2)
    sns.scatterplot(g, x="train_s", y="val_pct", hue="model", hue_order=_hue_order(data, g), palette=data.palette,
                    s=70, ax=ax, zorder=3)
    x, y = front["train_s_mean"].astype(float), 100 * front["val_mean"]
    ax.step(x, y, where="post", color="black", ls="--", lw=1.2, zorder=2, label="Pareto front")
    ax.scatter(x, y, s=220, facecolors="none", edgecolors="black", lw=1.4, zorder=4)
    # Numbers, not config names: names collide; the report's Pareto table spells each number out.
    for (px, py), numbers in front.groupby([x, y], sort=False)["front_no"]:
        ax.annotate(",".join(map(str, numbers)), (px, py), xytext=(9, 6), textcoords="offset points",
                    fontsize=10, fontweight="bold")
    if g["train_s"].max() > 20 * g["train_s"].min() > 0:
        ax.set_xscale("log")
    ax.margins(x=0.08, y=0.08)
    ax.set(xlabel="train time (s, mean over seeds)", ylabel="validation top-1 (%, mean over seeds)",
           title="Validation accuracy vs train time\n(circled and numbered: the Pareto front; its table gives test)")
    _legend_outside(ax, "model")
    return fig


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
    fig, (ax,) = _figure(8, 4.8)
    sns.lineplot(rows, x="batch_size", y="vram_gib", hue="model", hue_order=_hue_order(data, rows), style=style,
                 style_order=order if style else None, palette=data.palette, estimator="max", errorbar=None,
                 markers=True, markersize=8, ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(s) for s in sizes])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="batch size", ylabel="peak VRAM allocated (GiB)", ylim=(0, None),
           title="Peak VRAM vs batch size (max over other settings)")
    _legend_outside(ax)
    return fig


def freeze_effect(data: ReportData) -> Figure | str:
    labels = data.leaderboard["freeze"].dropna().astype(str).unique()
    if len(labels) < 2:
        return f"skipped: one freeze depth only ({', '.join(labels) or 'none'})"
    order = sorted(labels, key=tables.freeze_key)
    rows = _seed_rows(data, tables.best_per(data.leaderboard, ["model", "freeze"]))
    if rows.empty:
        return "skipped: no config has validation accuracy to choose by"
    rows = rows.assign(freeze=rows["freeze"].astype(str), train_s=rows["train_s"].astype(float))
    fig, axes = _figure(12, 4.8, ncols=2)
    for ax, y, label in zip(axes, ("top1_pct", "train_s"), (CHOSEN_TEST, "train time (s)")):
        sns.pointplot(rows, x="freeze", y=y, hue="model", order=order, hue_order=_hue_order(data, rows),
                      palette=data.palette, errorbar="sd", dodge=0.25, capsize=0.08, ax=ax, legend=ax is axes[-1])
        ax.set(xlabel="freeze depth (none = full fine-tune ... all = linear probe)", ylabel=label)
    axes[0].set_title("Accuracy by freeze depth (config chosen by validation)")
    axes[1].set_title("Train time by freeze depth (same configs)")
    _legend_outside(axes[-1], "model")
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
    fig, axes = _figure(4.8 * len(metrics), 4.4, ncols=len(metrics))
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


def _class_names(names: object, n: int) -> list[str]:
    """The recorded class names, or 0..n-1 when they are missing or do not match the matrix."""
    if isinstance(names, (list, np.ndarray)) and len(names) == n:
        return [str(c) for c in names]
    return [str(i) for i in range(n)]


def _matrices(rows: pd.DataFrame) -> list[np.ndarray]:
    return [np.array([np.asarray(r, dtype=float) for r in m]) for m in rows["confusion_matrix"]
            if isinstance(m, (list, np.ndarray)) and len(m) > 0]


def confusion_matrix(data: ReportData) -> Figure | str:
    """The config validation chose (#1), its seeds' matrices summed: every seed, not the luckiest one."""
    chosen = tables.best_per(data.leaderboard, [])
    if chosen.empty:
        return "skipped: no config has validation accuracy to choose by"
    best = chosen.iloc[0]
    seeds = data.trained[(data.trained["suite"] == best["suite"]) & (data.trained["group_id"] == best["group_id"])]
    matrices = _matrices(seeds)
    if not matrices:
        return "skipped: no confusion matrix recorded for the chosen config"
    if len({m.shape for m in matrices}) > 1 or matrices[0].ndim != 2 or matrices[0].shape[0] != matrices[0].shape[1]:
        return f"skipped: the chosen config's confusion matrices are not square and alike ({matrices[0].shape})"
    matrix = np.sum(matrices, axis=0)
    n = matrix.shape[0]
    names = _class_names(seeds["class_names"].iloc[0], n)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0) * 100
    side = min(max(6.0, 0.55 * n + 3), 16.0)
    fig, (ax,) = _figure(side + 1.2, side)
    ticks = names if n <= 50 else False
    sns.heatmap(share, annot=n <= 15, fmt=".0f", cmap="Blues", vmin=0, vmax=100, square=True, xticklabels=ticks,
                yticklabels=ticks, cbar_kws={"label": "% of the true class", "shrink": 0.8}, ax=ax)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set(xlabel="predicted class", ylabel="true class")
    pooled = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
    title = (f"Chosen by validation: {best['label']}; test set, {len(matrices)} seed(s) summed "
             f"(test top-1 {100 * pooled:.2f}%)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)))
    return fig


# The plot registry: key (also the PNG's file name) -> (title, function). Order is the report's order.
PLOTS: dict[str, tuple[str, Callable[[ReportData], Figure | str]]] = {
    "accuracy_vs_resolution": ("Accuracy vs resolution", accuracy_vs_resolution),
    "accuracy_vs_train_time": ("Accuracy vs train time, Pareto front", accuracy_vs_time),
    "vram_vs_batch_size": ("Peak VRAM vs batch size", vram_vs_batch),
    "freeze_depth": ("Effect of freeze depth", freeze_effect),
    "training_curves": ("Training and validation curves", training_curves),
    "confusion_matrix": ("Confusion matrix of the config chosen by validation", confusion_matrix),
}


def make_plots(data: ReportData) -> list[Plot]:
    """Draw every registered plot; a plot with nothing to show becomes a note, never an empty figure."""
    out = []
    with mpl.rc_context(_RC):
        for key, (title, draw) in PLOTS.items():
            result = draw(data)
            out.append(Plot(key, title, None, result) if isinstance(result, str) else Plot(key, title, _png(result)))
    return out
