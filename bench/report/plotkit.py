"""What every plot shares: the figure and PNG helpers, legends, and how points of one model are told apart.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly: no pyplot state,
no GUI backend, nothing that depends on (or changes) the caller's matplotlib backend.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.report import tables
from bench.report.context import ReportData

PNG_DPI = 150
# Large enough to read in print at the width of a page; the PNGs are saved at 150 dpi.
# Model names and labels are data, not TeX: a '$' in one must not switch matplotlib into math mode.
RC = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=1.05), "legend.fontsize": 10,
      "text.parse_math": False}
CHOSEN_TEST = "test top-1 (%) of the config\nvalidation chose"
# Axes whose values span orders of magnitude read best on a log scale once they spread this much.
LOG_SPREAD = 20


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())


def png(fig: Figure) -> bytes:
    # bbox "tight": the canvas grows to hold every label, so a long title or a legend outside is never cut off
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()


def suptitle(fig: Figure, text: str, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width, as drawn (a guess from the number of characters overflows)."""
    renderer = fig.canvas.get_renderer()
    width = len(text)
    while True:
        title = fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=fontsize)
        if title.get_window_extent(renderer).width <= 0.95 * fig.bbox.width or width <= 20:
            return
        width = int(width * 0.9)


def legend_outside(ax, title: str | None = None) -> None:
    """Legends go right of the axes: inside they cover points sooner or later."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title=title)


def hue_order(data: ReportData, rows: pd.DataFrame) -> list[str]:
    present = set(rows["model"].astype(str))
    return [m for m in data.palette if m in present]


def seed_rows(data: ReportData, groups: pd.DataFrame) -> pd.DataFrame:
    """The per-seed rows of the chosen configs, top1 in percent: seaborn draws the spread across seeds."""
    keys = groups[["suite", "group_id"]]
    rows = data.trained.merge(keys, on=["suite", "group_id"])
    return rows.assign(top1_pct=100 * rows["top1"])


def log_x(ax, base: int = 10) -> None:
    """A log x axis with plain tick labels (0.1, 0.2, 0.5, 1 or 64, 128, 256): matplotlib's default labels are
    mathtext, which the report turns off so that a '$' in a model name stays a '$'."""
    ax.set_xscale("log", base=base)
    plain(ax.xaxis, base)


def plain(axis, base: int = 10) -> None:
    """Plain log tick labels on `axis` (an x axis, or a secondary one)."""
    axis.set_major_locator(LogLocator(base=base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def spread(values: pd.Series) -> bool:
    """Whether positive values span enough to need a log axis."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v)) and v.min() > 0 and v.max() > LOG_SPREAD * v.min()


# The axes that tell two configs of one model apart on a scatter, most telling first: the first that varies sets
# the marker, the second the marker's size.
DISTINGUISH = ("resolution", "freeze", "batch_size", "train_subset", "epochs")


def marks(rows: pd.DataFrame) -> tuple[dict[str, pd.Series], dict]:
    """The axes varying among `rows` (two at most) as text-label columns to assign, and the seaborn `style` and
    `size` arguments that mark them: two points of one model (same colour) then differ in marker or size."""
    columns, kwargs = {}, {}
    varying = [a for a in DISTINGUISH if a in rows and rows[a].astype(str).nunique() > 1][:2]
    for axis, role in zip(varying, ("style", "size")):
        labels, order = tables.axis_labels(rows[axis], axis)
        unit = " px" if axis == "resolution" else ""
        columns[axis] = labels + unit
        kwargs |= {role: axis, f"{role}_order": [f"{v}{unit}" for v in order]}
    if "size" in kwargs:  # more training is bigger: a freeze depth from none (largest) to all, numbers ascending
        order = kwargs["size_order"]
        steps = np.linspace(260, 40, len(order)) if kwargs["size"] == "freeze" else np.linspace(40, 260, len(order))
        kwargs["sizes"] = dict(zip(order, steps))
    else:
        kwargs["s"] = 80
    return columns, kwargs


def scatter(ax, data: ReportData, rows: pd.DataFrame, x: str, y: str) -> None:
    """Configs as points: colour per model (the same in every plot), marker and size per the axes that vary."""
    columns, kwargs = marks(rows)
    rows = rows.assign(**columns)
    sns.scatterplot(rows, x=x, y=y, hue="model", hue_order=hue_order(data, rows), palette=data.palette,
                    legend="full", ax=ax, zorder=3, **kwargs)
