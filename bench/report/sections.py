"""The report's sections, in order: each turns the `ReportData` into tables, plots and notes.

Both renderers (Markdown and HTML) walk the same sections, so the two files always show the same content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from bench.report import fmt, tables
from bench.report.context import ReportData
from bench.report.plots import make_plots


@dataclass
class Section:
    key: str
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)  # ("table", Table) | ("plot", Plot) | ("note", str)

    def add(self, kind: str, item: object) -> Section:
        self.blocks.append((kind, item))
        return self


def _metrics(prefix: list[fmt.Column]) -> list[fmt.Column]:
    return prefix + [
        ("top1 % (mean ± std)", lambda r: fmt.pct(r["top1_mean"], r["top1_std"]), True),
        ("n", lambda r: fmt.text(r["n"]) + (f" (+{int(r['n_failed'])} failed)" if r.get("n_failed", 0) else ""), True),
        ("top5 %", lambda r: fmt.pct(r["top5_mean"]), True),
        ("train time", lambda r: fmt.seconds(r["train_s_mean"]), True),
        ("images/s", lambda r: fmt.rate(r["images_per_s_mean"]), True),
        ("peak VRAM", lambda r: fmt.nbytes(r["peak_vram_allocated_bytes"]), True),
        ("peak host RAM", lambda r: fmt.nbytes(r["peak_host_rss_bytes"]), True),
        ("trainable params", lambda r: fmt.count(r["trainable_params"]), True),
        ("total params", lambda r: fmt.count(r["total_params"]), True),
        ("GFLOPs/image", lambda r: fmt.gflops(r["flops_per_image"]), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]


def _drop_empty(table: fmt.Table) -> fmt.Table:
    """Metric columns nobody recorded (VRAM on a CPU run) are dropped, and the note says which."""
    keep = [i for i, c in enumerate(table.columns) if any(row[i] != fmt.DASH for row in table.rows)]
    gone = [c for i, c in enumerate(table.columns) if i not in keep]
    note = " ".join(filter(None, [table.note, f"Not recorded: {', '.join(gone)}." if gone and table.rows else ""]))
    rows = [[row[i] for i in keep] for row in table.rows]
    return fmt.Table(table.title, [table.columns[i] for i in keep], rows, [table.numeric[i] for i in keep], note,
                     table.details, table.css)


def leaderboard(data: ReportData) -> Section:
    section = Section("leaderboard", "Leaderboard")
    if data.groups.empty:
        return section.add("note", "No cell finished training successfully, so there is nothing to rank yet.")
    ranked = data.groups.assign(rank=range(1, len(data.groups) + 1))
    columns = _metrics([("#", lambda r: str(r["rank"]), True)] + fmt.config_columns(data.config))
    note = ("One row per config; seeds folded into mean ± std (n seeds), sorted by test top-1. "
            "Times are means over seeds, memory the largest peak of any seed.")
    section.add("table", _drop_empty(fmt.table("", ranked, columns, note)))
    return section.add("table", _pareto(data))


def _pareto(data: ReportData) -> fmt.Table:
    columns = [
        ("#", lambda r: str(r["front_no"]), True), ("config", lambda r: fmt.text(r["label"]), False),
        ("top1 %", lambda r: fmt.pct(r["top1_mean"], r["top1_std"]), True),
        ("train time", lambda r: fmt.seconds(r["train_s_mean"]), True), ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    note = ("Configs no other config beats on both accuracy and train time (the numbered points in the "
            "accuracy vs train time plot), fastest first.")
    return fmt.table("Pareto front: accuracy vs train time", tables.pareto_rows(data.groups), columns, note)


def failed(data: ReportData) -> Section:
    section = Section("failed", "Failed cells")
    if data.failed.empty:
        return section.add("note", "None: every shown cell finished with status ok.")
    rows = data.failed.sort_values(["suite", "model", "status", "seed"], kind="stable")
    suite = [("suite", lambda r: fmt.text(r["suite"]), False)] if data.current["suite"].nunique() > 1 else []
    columns = suite + [
        ("config", lambda r: tables.config_label(r, data.extra), False), ("seed", lambda r: fmt.text(r["seed"]), True),
        ("status", lambda r: fmt.text(r["status"]), False), ("error", lambda r: fmt.one_line(r["error"]), False),
        ("cell id", lambda r: fmt.text(r["cell_id"]), False), ("run", lambda r: fmt.text(r["run_id"]), False),
    ]
    note = f"{len(rows)} of {len(data.current)} cells did not finish; the full message is in the cell's log."
    return section.add("table", fmt.table("", rows, columns, note, css=lambda r: "bad"))


def speed(data: ReportData) -> Section:
    section = Section("speed", "Throughput (speed-only cells)")
    if data.speed.empty:
        return section.add("note", "No throughput-mode cells in these results.")
    columns = fmt.config_columns(data.config) + [
        ("images/s (mean ± std)", lambda r: _rate_std(r["images_per_s_mean"], r["images_per_s_std"]), True),
        ("n", lambda r: fmt.text(r["n"]), True), ("warm-up", lambda r: fmt.seconds(r["warmup_s_mean"]), True),
        ("peak VRAM", lambda r: fmt.nbytes(r["peak_vram_allocated_bytes"]), True),
        ("peak host RAM", lambda r: fmt.nbytes(r["peak_host_rss_bytes"]), True),
        ("GFLOPs/image", lambda r: fmt.gflops(r["flops_per_image"]), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    note = "Cells run with mode: throughput measure speed only (no accuracy); fastest first."
    return section.add("table", _drop_empty(fmt.table("", data.speed, columns, note)))


def _rate_std(mean: object, std: object) -> str:
    return fmt.rate(mean) if pd.isna(std) else f"{fmt.rate(mean)} ± {fmt.rate(std)}"


def comparison(data: ReportData) -> Section:
    section = Section("comparison", "Comparison with the previous run")
    if not data.baseline_runs:
        return section.add("note", "No earlier run of these suites shares cells with the shown rows; nothing to compare.")
    against = ", ".join(f"{s}: run {r}" for s, r in data.baseline_runs.items())
    if data.comparison.empty:
        return section.add("note", f"Compared with {against}: no cell has rows in both.")
    flagged = int((data.comparison["regression"] != "").sum())
    columns = [
        ("config", lambda r: fmt.text(r["label"]), False), ("seed", lambda r: fmt.text(r["seed"]), True),
        ("top1 % before", lambda r: fmt.pct(r["top1_before"]), True),
        ("top1 % now", lambda r: fmt.pct(r["top1_after"]), True),
        ("Δ top1 (pts)", lambda r: fmt.delta_pts(r["top1_delta"]), True),
        ("images/s before", lambda r: fmt.rate(r["ips_before"]), True),
        ("images/s now", lambda r: fmt.rate(r["ips_after"]), True),
        ("Δ images/s", lambda r: fmt.delta_rel(r["ips_rel"]), True),
        ("status", lambda r: f"{r['status_before']} → {r['status_after']}", False),
        ("regression", lambda r: r["regression"] or "", False), ("cell id", lambda r: fmt.text(r["cell_id"]), False),
    ]
    long = len(data.comparison) > 25  # the regressions are repeated at the top; fold the rest in the HTML
    note = (f"Compared with {against}. {flagged} of {len(data.comparison)} cells regressed (top1 drop > "
            f"{100 * data.top1_drop:.2f} pts, images/s drop > {100 * data.speed_drop:.0f}%, or no longer ok).")
    return section.add("table", fmt.table("", data.comparison, columns, note, details=long,
                                          css=lambda r: "bad" if r["regression"] else ""))


_AGG_NOTE = {"max": "best config over the other settings", "mean": "mean over the other settings"}


def pivots(data: ReportData) -> Section:
    section = Section("pivots", "Along each axis")
    for spec in tables.PIVOTS:
        values = data.groups[spec.columns].dropna().astype(str).unique() if not data.groups.empty else []
        if len(values) < 2:
            section.add("note", f"{spec.title}: skipped, one {spec.columns} only ({', '.join(values) or 'none'}).")
            continue
        table = tables.pivot(data.groups, spec)
        if table.empty:
            section.add("note", f"{spec.title}: skipped, {spec.value} was not recorded.")
            continue
        section.add("table", _pivot_table(table, spec))
    return section


def _pivot_table(table: pd.DataFrame, spec: tables.PivotSpec) -> fmt.Table:
    show = fmt.UNITS[spec.unit]
    heads = [f"{spec.columns} {fmt.text(c)}" for c in table.columns]
    rows = [[fmt.text(idx)] + [show(v) for v in row] for idx, row in zip(table.index, table.to_numpy())]
    return fmt.Table(spec.title, [spec.index] + heads, rows, [False] + [True] * len(heads), f"Each value: {_AGG_NOTE[spec.agg]}.")


def plots(data: ReportData) -> Section:
    section = Section("plots", "Plots")
    for plot in make_plots(data):
        section.add("plot", plot)
    return section


def cells(data: ReportData) -> Section:
    rows = data.current.sort_values(["suite", "model", "resolution", "batch_size", "freeze", "seed"], kind="stable")
    columns = [
        ("suite", lambda r: fmt.text(r["suite"]), False), ("config", lambda r: tables.config_label(r, data.extra), False),
        ("seed", lambda r: fmt.text(r["seed"]), True), ("mode", lambda r: fmt.text(r["mode"]), False),
        ("status", lambda r: fmt.text(r["status"]), False), ("top1 %", lambda r: fmt.pct(r["top1"]), True),
        ("train time", lambda r: fmt.seconds(r["train_s"]), True), ("images/s", lambda r: fmt.rate(r["images_per_s"]), True),
        ("run", lambda r: fmt.text(r["run_id"]), False), ("cell id", lambda r: fmt.text(r["cell_id"]), False),
        ("finished", lambda r: _when(r["finished_at"]), False),
    ]
    note = "Every shown cell, one row each (the newest row of a cell that ran more than once)."
    return Section("cells", "All cells").add("table", fmt.table("", rows, columns, note, details=True))


def _when(value: object) -> str:
    return fmt.DASH if pd.isna(value) else pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")


# The section registry, in report order.
SECTIONS: dict[str, Callable[[ReportData], Section]] = {
    "leaderboard": leaderboard, "failed": failed, "speed": speed, "comparison": comparison,
    "pivots": pivots, "plots": plots, "cells": cells,
}
