"""`bench results`: the runs and cells of a results folder as text, and the leaderboard as CSV or JSON.

The export holds raw values (fractions, seconds, bytes; units in the column names), so its numbers are the
leaderboard's own, not the report's rounded text.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd

from bench.report import fmt, tables
from bench.report.context import ReportData
from bench.report.select import normalise

# Leaderboard column -> export column (units in the names; accuracies are fractions in [0, 1]).
RENAMED = {
    "group_id": "config_id", "n": "seeds", "n_failed": "seeds_failed",
    "val_mean": "val_top1_mean", "val_std": "val_top1_std",
    "top1_mean": "test_top1_mean", "top1_std": "test_top1_std", "top5_mean": "test_top5_mean",
}
METRICS = [
    "tried", "n", "n_failed", "val_mean", "val_std", "top1_mean", "top1_std", "top5_mean", "vs_best", "p_holm",
    "train_s_mean", "train_s_std", "train_hours", "train_device", "images_per_s_mean",
    "infer_latency_ms_p50", "infer_latency_ms_p95", "infer_images_per_s", "infer_peak_vram_bytes", "model_bytes",
    # Memory as the report gives it (`tables.MEMORY_AGGS`): VRAM on the card (what --max-vram judges) and host RAM
    # as PSS, each with the flag that says a config's figure came from the older column (allocator peak, RSS).
    "vram_card_bytes", "vram_allocator_fallback", "peak_vram_allocated_bytes", "peak_vram_train_bytes",
    "data_device_bytes", "peak_host_bytes", "host_rss_fallback",
    "trainable_params", "total_params", "flops_per_image", "train_images", "group_id", "cell_ids", "label",
]
FORMATS = ("table", "csv", "json")


def leaderboard_frame(data: ReportData) -> pd.DataFrame:
    """The leaderboard's rows (ranked by validation, then the unranked), raw values, with which recommendation
    (best, cheapest, fastest, smallest) picked each row."""
    board = data.leaderboard
    config = [c for c in data.config if c != "suite"]
    picked = data.advice.picks.groupby("group_id")["question"].agg(", ".join) if len(data.advice.picks) else {}
    out = board[["rank", "suite", *config, *METRICS]].rename(columns=RENAMED)
    out.insert(1, "recommended", [picked.get(g, "") for g in board["group_id"]])
    return out.reset_index(drop=True)


def to_csv(frame: pd.DataFrame) -> str:
    # Floats as Python writes them (shortest repr), so reading the file back gives the same numbers.
    return frame.to_csv(index=False, lineterminator="\n")


def to_json(frame: pd.DataFrame) -> str:
    """One JSON object per row; missing values are null."""
    records = [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def runs_frame(cells: pd.DataFrame, *, run: str | None = None, suite: str | None = None) -> pd.DataFrame:
    """One line per run: suite, run id, cells, how many ok and not, first start and last finish (text)."""
    rows = normalise(cells)
    if suite:
        rows = rows[rows["suite"] == suite]
    if run:
        rows = rows[rows["run_id"] == run]
    by = rows.assign(ok=rows["status"] == "ok").groupby(["suite", "run_id"])
    runs = by.agg(cells=("cell_id", "size"), ok=("ok", "sum"), started=("started_at", "min"),
                  finished=("finished_at", "max")).reset_index()
    runs["failed"] = runs["cells"] - runs["ok"]
    runs = runs.sort_values(["started", "suite", "run_id"], na_position="first", kind="stable")
    for column in ("started", "finished"):
        runs[column] = [_when(v) for v in runs[column]]
    return runs[["suite", "run_id", "cells", "ok", "failed", "started", "finished"]].reset_index(drop=True)


def cells_frame(data: ReportData) -> pd.DataFrame:
    """One line per shown cell (the newest row of each): status, accuracy and time, as text."""
    rows = data.current.sort_values(["suite", "model", "resolution", "batch_size", "freeze", "seed"], kind="stable")
    return pd.DataFrame({
        "suite": rows["suite"].astype(str), "run_id": rows["run_id"].astype(str),
        "cell_id": rows["cell_id"].astype(str),
        "config": [tables.config_label(r, data.extra) for r in rows.to_dict("records")],
        "seed": [fmt.text(v) for v in rows["seed"]], "mode": rows["mode"].astype(str),
        "status": rows["status"].astype(str),
        "val_top1_%": [fmt.pct(v) for v in rows["val_top1_tested"]], "test_top1_%": [fmt.pct(v) for v in rows["top1"]],
        "train": [fmt.seconds(v) for v in rows["train_s"]], "wall": [fmt.seconds(v) for v in rows["wall_s"]],
    })


def _when(value: object) -> str:
    return fmt.DASH if pd.isna(value) else pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")


def table_text(runs: pd.DataFrame, cells: pd.DataFrame) -> str:
    buf = io.StringIO()
    buf.write(f"{len(runs)} run(s)\n{runs.to_string(index=False)}\n\n")
    buf.write(f"{len(cells)} cell(s), the newest row of each\n{cells.to_string(index=False)}\n")
    return buf.getvalue()
