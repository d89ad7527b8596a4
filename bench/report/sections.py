"""The report's sections, in order: each turns the `ReportData` into tables, plots and notes.

Both renderers (Markdown and HTML) walk the same sections, so the two files always show the same content.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from bench import status
from bench.report import advice, fmt, race, stats, tables
from bench.report.comparison import comparison
from bench.report.context import ReportData
from bench.report.fmt import Section
from bench.report.plots import make_plots

VAL = "val top-1 % (selects)"
TEST = "test top-1 % (reported)"


def _accuracy() -> list[fmt.Column]:
    """Validation (what chooses) and test (what is reported), side by side, mean ± std over seeds."""
    return [(VAL, lambda r: fmt.pct(r["val_mean"], r["val_std"]), True),
            (TEST, lambda r: fmt.pct(r["top1_mean"], r["top1_std"]), True)]


def _n(r: pd.Series) -> str:
    return fmt.text(r["n"]) + (f" (+{int(r['n_failed'])} failed)" if r.get("n_failed", 0) else "")


def _metrics(prefix: list[fmt.Column]) -> list[fmt.Column]:
    return prefix + _accuracy() + [
        ("n", _n, True),
        ("vs #1 (McNemar)", lambda r: r["vs_best"] or fmt.DASH, False),
        ("p (Holm)", lambda r: _p(r["p_holm"]), True),
        ("test top-5 %", lambda r: fmt.pct(r["top5_mean"]), True),
        ("train time", _timed(lambda r: fmt.seconds(r["train_s_mean"])), True),
        ("device-hours", _timed(lambda r: f"{fmt.hours(r['train_hours'])} {r['train_device']}-h"
                                if pd.notna(r["train_hours"]) else fmt.DASH), True),
        ("images/s", _timed(lambda r: fmt.rate(r["images_per_s_mean"])), True),
        ("latency batch 1 (p50)", _timed(lambda r: fmt.ms(r["infer_latency_ms_p50"])), True),
        ("latency p95", _timed(lambda r: fmt.ms(r["infer_latency_ms_p95"])), True),
        ("inference images/s", _timed(lambda r: fmt.rate(r["infer_images_per_s"])), True),
        ("weights", lambda r: fmt.nbytes(r["model_bytes"]), True),
        ("VRAM on the card", lambda r: fmt.nbytes(r["peak_vram_process_bytes"]), True),
        ("peak VRAM", lambda r: fmt.nbytes(r["peak_vram_allocated_bytes"]), True),
        ("VRAM for training", lambda r: fmt.nbytes(r["peak_vram_train_bytes"]), True),
        ("inference VRAM", lambda r: fmt.nbytes(r["infer_peak_vram_bytes"]), True),
        ("peak host RAM", _host_ram, True),
        ("trainable params", lambda r: fmt.count(r["trainable_params"]), True),
        ("total params", lambda r: fmt.count(r["total_params"]), True),
        ("GFLOPs/image", lambda r: fmt.gflops(r["flops_per_image"]), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
        ("cell ids", lambda r: fmt.text(r["cell_ids"]), False),
    ]


SHARED = "†"  # marks a time measured while other cells ran on the same host


def _shared(r: pd.Series) -> bool:
    value = pd.to_numeric(r.get("concurrent_cells"), errors="coerce")
    return bool(pd.notna(value) and value > 1)


def _timed(show: Callable[[pd.Series], str]) -> Callable[[pd.Series], str]:
    """A time column whose figure is marked † when its cell ran beside other cells on its host."""
    def get(r: pd.Series) -> str:
        text = show(r)
        return f"{text} {SHARED}" if text != fmt.DASH and _shared(r) else text

    return get


def _host_ram(r: pd.Series) -> str:
    """Peak host RAM as PSS; '(RSS)' where only RSS was recorded (rows from before PSS)."""
    text = fmt.nbytes(r["peak_host_bytes"])
    return f"{text} (RSS)" if text != fmt.DASH and bool(r["host_rss_fallback"]) else text


def memory_note(frame: pd.DataFrame) -> str:
    """What the memory columns mean, below a table that shows them (VRAM only where some row recorded it)."""
    text = "Memory: the largest peak of any seed. "
    if frame["peak_vram_allocated_bytes"].notna().any():
        text += ("VRAM on the card: what the cell's process held on its GPU (NVML, per process: CUDA context and "
                 "allocator reserve included), what --max-vram budgets; peak and training VRAM: the allocator's "
                 "(training VRAM without the resident dataset); inference VRAM: one batch's peak on the trained "
                 "weights, without gradients or optimizer state. ")
    text += "Host RAM: the PSS of the cell's process tree (a page its processes share counted once)"
    if frame["host_rss_fallback"].fillna(False).astype(bool).any():
        text += "; (RSS): rows from before PSS was recorded, where a page shared by n processes counts n times"
    return text + "."


def shared_note(frame: pd.DataFrame) -> str:
    """The sentence under a table whose time figures include rows that shared their host (empty when none did)."""
    if frame.empty:
        return ""
    shared = tables.shared_host(frame)
    if not shared.any():
        return ""
    most = int(pd.to_numeric(frame["concurrent_cells"], errors="coerce").max())
    return (f"{SHARED} {int(shared.sum())} row(s) ran beside other cells on the same host (up to {most} at once, "
            "concurrent_cells): they shared its CPU cores and memory bandwidth, so their times are slower than the "
            "cell alone would be; compare them with rows that ran alone with care.")


def _p(value: object) -> str:
    if pd.isna(value):
        return fmt.DASH
    return "< 0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def _drop_empty(table: fmt.Table) -> fmt.Table:
    """Metric columns nobody recorded (VRAM on a CPU run) are dropped, and the note says which."""
    keep = [i for i, c in enumerate(table.columns) if any(row[i] not in (fmt.DASH, "") for row in table.rows)]
    gone = [c for i, c in enumerate(table.columns) if i not in keep]
    note = " ".join(filter(None, [table.note, f"Not recorded: {', '.join(gone)}." if gone and table.rows else ""]))
    rows = [[row[i] for i in keep] for row in table.rows]
    return fmt.Table(table.title, [table.columns[i] for i in keep], rows, [table.numeric[i] for i in keep], note,
                     table.details, table.css)


def tuned_text(row: pd.Series, tuned: list[str]) -> str:
    """The tuned values a row stands for, and how many were tried: 'lr 0.01 (best of 3)'."""
    values = ", ".join(f"{c} {fmt.text(row[c])}" for c in tuned)
    return f"{values} (best of {int(row['tried'])})" if row["tried"] > 1 else values


SELECTION_NOTE = (
    "One row per config, seeds folded into mean ± std (n seeds). Chosen on validation, reported on test: the "
    "order is the validation top-1 (mean over seeds, of the weights the test score was measured on: the best "
    "validation epoch's with restore_best, the last epoch's without; ties go to the shorter train time); test top-1 is shown beside it and never decides anything. "
    "Times are means over seeds, memory the largest peak of any seed."
)


def _sweep_note(data: ReportData) -> str:
    if not data.tuned:
        return ""
    return (f"Tuned hyperparameters ({', '.join(data.tuned)}) are folded: each row is its backbone config at the "
            "values with the best validation mean, 'tuned' shows them and how many were tried, and the "
            "'Hyperparameter sweeps' section lists every value.")


def _mcnemar_note(board: pd.DataFrame) -> str:
    if not (board["vs_best"] != "").any():
        return ("vs #1: no pair of configs recorded which test images they got right on the same test set "
                "(rows from before bench recorded test_correct), so no difference is tested.")
    return (f"vs #1: a paired test of each config against #1 on the same test images: per image, #1 right minus "
            f"this config right, averaged over the seeds both ran; the sign test on the images where that is not 0 "
            f"(McNemar's test when one seed ran; exact binomial up to {stats.EXACT_MAX} such images, chi-squared with "
            f"continuity correction above), so seeds that agree add no evidence; two-sided, Holm-corrected over the "
            f"configs compared, α = {stats.ALPHA}. "
            "≈ best: not significantly different from #1, so the ranking between them is noise; worse / better: "
            "significantly so on test (in the HTML, #1 and the configs ≈ best are green). A dash: no paired "
            "data (a different test set, or rows without test_correct).")


def _unranked_note(board: pd.DataFrame) -> str:
    unranked = int(board["rank"].isna().sum())
    if not unranked:
        return ""
    return (f"{unranked} config(s) without validation accuracy (val_fraction 0, or no validation recorded) "
            "cannot be chosen on validation: they follow the ranked ones unranked (#: –; greyed in the HTML), in config order, "
            "with their test top-1 for reference only; a sweep among them is not folded.")


def _row_class(r: pd.Series) -> str:
    if pd.isna(r["rank"]):
        return "unranked"
    return "near" if r["vs_best"] in ("best", "≈ best") else ""


def leaderboard(data: ReportData) -> Section:
    section = Section("leaderboard", "Leaderboard (chosen on validation, reported on test)")
    board = data.leaderboard
    if board.empty:
        return section.add("note", "No cell finished training successfully, so there is nothing to rank yet.")
    config = [c for c in data.config if c not in data.tuned]
    tuned = [("tuned (chosen by val)", lambda r: tuned_text(r, data.tuned), False)] if data.tuned else []
    rank = [("#", lambda r: fmt.DASH if pd.isna(r["rank"]) else str(r["rank"]), True)]
    columns = _metrics(rank + fmt.config_columns(config) + tuned)
    note = " ".join(filter(None, [SELECTION_NOTE, _sweep_note(data)]))
    section.add("table", _drop_empty(fmt.table("", board, columns, note, css=_row_class)))
    legends = [shared_note(board), _mcnemar_note(board), _unranked_note(board), memory_note(board)]
    for legend in filter(None, legends):  # read below the table
        section.add("note", legend)
    dropped = race.dropped_table(data)
    if dropped is not None:
        section.add("table", dropped)
    return section.add("table", _pareto(data))


def _pareto(data: ReportData) -> fmt.Table:
    columns = [
        ("#", lambda r: str(r["front_no"]), True), ("config", lambda r: fmt.text(r["label"]), False),
        *_accuracy(), ("train time", _timed(lambda r: fmt.seconds(r["train_s_mean"])), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    left_out = int(data.leaderboard["val_mean"].isna().sum())
    note = ("Leaderboard configs no other beats on both validation accuracy and train time (the numbered points "
            "in the accuracy vs train time plot), fastest first; the front is drawn on validation, test is reported."
            + (f" {left_out} config(s) without validation accuracy are not on it." if left_out else ""))
    front = tables.pareto_rows(data.leaderboard)
    note = " ".join(filter(None, [note, shared_note(front)]))
    return fmt.table("Pareto front: validation accuracy vs train time", front, columns, note)


def sweep(data: ReportData) -> Section:
    section = Section("sweep", "Hyperparameter sweeps")
    folded = data.leaderboard[data.leaderboard["tried"] > 1]
    if folded.empty:
        names = ", ".join(tables.TUNED)
        return section.add("note", f"No tuned hyperparameter ({names}) takes more than one value within a config "
                                   "with validation accuracy; nothing was folded.")
    chosen = set(folded["group_id"])
    ids = [g for candidates in folded["candidates"] for g in candidates]  # leaderboard order, best value first
    rows = data.configs.set_index("group_id", drop=False).loc[ids].reset_index(drop=True)
    columns = [
        ("config", lambda r: fmt.text(r["backbone_label"]), False),
        *[(c, (lambda r, c=c: fmt.text(r[c])), True) for c in data.tuned],
        ("chosen", lambda r: "✓" if r["group_id"] in chosen else "", False), *_accuracy(), ("n", _n, True),
        ("train time", _timed(lambda r: fmt.seconds(r["train_s_mean"])), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    note = (f"Every value tried for the {len(folded)} leaderboard row(s) that fold a sweep, best validation first; "
            "✓ marks the one validation chose, whose test top-1 the leaderboard reports.")
    note = " ".join(filter(None, [note, shared_note(rows)]))
    return section.add("table", fmt.table("", rows, columns, note, details=len(rows) > 25,
                                          css=lambda r: "near" if r["group_id"] in chosen else ""))


def failed(data: ReportData) -> Section:
    section = Section("failed", "Failed cells")
    failures = data.failed[data.failed["status"] != status.DROPPED]  # a race's answer, not a failure
    if failures.empty:
        raced = " or was dropped by the race (listed under the leaderboard)" if len(data.failed) else ""
        return section.add("note", f"None: every shown cell finished with status ok{raced}.")
    rows = failures.sort_values(["suite", "model", "status", "seed"], kind="stable")
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
        ("images/s (mean ± std)", _timed(lambda r: _rate_std(r["images_per_s_mean"], r["images_per_s_std"])), True),
        ("n", lambda r: fmt.text(r["n"]), True), ("warm-up", _timed(lambda r: fmt.seconds(r["warmup_s_mean"])), True),
        ("VRAM on the card", lambda r: fmt.nbytes(r["peak_vram_process_bytes"]), True),
        ("peak VRAM", lambda r: fmt.nbytes(r["peak_vram_allocated_bytes"]), True),
        ("peak host RAM", _host_ram, True),
        ("GFLOPs/image", lambda r: fmt.gflops(r["flops_per_image"]), True),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    note = " ".join(filter(None, ["Cells run with mode: throughput measure speed only (no accuracy); fastest first.",
                                  shared_note(data.speed), memory_note(data.speed)]))
    return section.add("table", _drop_empty(fmt.table("", data.speed, columns, note)))


def _rate_std(mean: object, std: object) -> str:
    return fmt.rate(mean) if pd.isna(std) else f"{fmt.rate(mean)} ± {fmt.rate(std)}"


_AGG_NOTE = {"chosen": "test top-1 of the config with the best validation mean over the other settings "
                       "(validation chooses, test is reported)",
             "max": "largest over the other settings", "mean": "mean over the other settings"}


def pivots(data: ReportData) -> Section:
    section = Section("pivots", "Along each axis")
    if not data.axes and not data.leaderboard.empty:
        section.add("note", "No config axis varies beyond the model: the leaderboard is the whole comparison.")
    for spec in [*tables.accuracy_pivots(data.axes), *tables.PIVOTS]:
        # A choice is made among the leaderboard's rows (each backbone config at its chosen tuned values), or among
        # every config for a tuned axis; means and peaks are over every config run.
        source = data.leaderboard if spec.agg == "chosen" and spec.columns not in tables.TUNED else data.configs
        values = source[spec.columns].astype(str).unique() if not source.empty else []
        if len(values) < 2:
            section.add("note", f"{spec.title}: skipped, one {spec.columns} only ({', '.join(values) or 'none'}).")
            continue
        table = tables.pivot(source, spec)
        if table.empty:
            section.add("note", f"{spec.title}: skipped, {spec.value} was not recorded.")
            continue
        section.add("table", _pivot_table(table, spec, source))
    return section


def _pivot_table(table: pd.DataFrame, spec: tables.PivotSpec, source: pd.DataFrame) -> fmt.Table:
    show = fmt.UNITS[spec.unit]
    heads = [f"{spec.columns} {c}" for c in table.columns]
    rows = [[fmt.text(idx)] + [show(v) for v in row] for idx, row in zip(table.index, table.to_numpy())]
    note = f"Each value: {_AGG_NOTE[spec.agg]}."
    if spec.agg == "chosen" and source["val_mean"].isna().any():
        note += (" Configs without validation accuracy cannot be chosen: a value is shown for one only when it is "
                 "the only config there; otherwise the entry is empty.")
    return fmt.Table(spec.title, [spec.index] + heads, rows, [False] + [True] * len(heads), note)


def race_section(data: ReportData) -> Section | None:
    """Each raced suite's rungs, configs and device-hours, and the curves; None (no section) without a race."""
    found = race.races(data)
    if not found:
        return None
    section = Section("race", "Race")
    for r in found:
        section.add("lead", race.summary(r)).add("table", race.rung_table(r))
        for line in filter(None, [race.unrecorded(r), race.cost(r)]):
            section.add("note", line)
    for plot in make_plots(data, "race"):
        section.add("plot", plot)
    if any(r.count(race.DROPPED) for r in found):  # the risk is in what was dropped
        section.add("note", race.RISK)
    return section


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
        ("status", lambda r: fmt.text(r["status"]), False), ("val top-1 %", lambda r: fmt.pct(r["val_top1_tested"]), True),
        ("test top-1 %", lambda r: fmt.pct(r["top1"]), True), ("test epoch", lambda r: fmt.text(r["test_epoch"]), True),
        ("train time", _timed(lambda r: fmt.seconds(r["train_s"])), True),
        ("images/s", _timed(lambda r: fmt.rate(r["images_per_s"])), True),
        ("run", lambda r: fmt.text(r["run_id"]), False), ("cell id", lambda r: fmt.text(r["cell_id"]), False),
        ("finished", lambda r: _when(r["finished_at"]), False),
    ]
    note = ("Every shown cell, one row each (the newest row of a cell that ran more than once). Val top-1: the "
            "validation score of the weights tested (test epoch): the best epoch's where restore_best is on, the last's "
            "where it is off.")
    note = " ".join(filter(None, [note, shared_note(rows)]))
    return Section("cells", "All cells").add("table", fmt.table("", rows, columns, note, details=True))


def _when(value: object) -> str:
    return fmt.DASH if pd.isna(value) else pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")


# The section registry, in report order. A section that only some results have returns None without them: the
# race's, which a report over rows that never raced neither shows nor mentions.
SECTIONS: dict[str, Callable[[ReportData], Section | None]] = {
    "recommend": advice.recommend, "leaderboard": leaderboard, "race": race_section, "per_class": advice.per_class,
    "sweep": sweep, "failed": failed, "speed": speed, "comparison": comparison, "pivots": pivots, "plots": plots,
    "cells": cells,
}
