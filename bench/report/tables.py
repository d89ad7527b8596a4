"""The report's numbers: seeds folded into one leaderboard row per config, pivots, the Pareto front.

Functions here take and return DataFrames of raw values (fractions, seconds, bytes); `fmt` turns them
into text. Tests check these numbers against the rows they wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.suite import CELL_FIELDS

# Always shown: the axes a transfer-learning grid is usually built from.
KEY_CONFIG = ["model", "resolution", "batch_size", "freeze"]
# Never config columns: identity, the seed (folded), and how-to-run fields that do not change results.
NOT_CONFIG = {"suite", "seed", "cell_timeout_s", "mode", "throughput_warmup_steps", "throughput_steps"}
OTHER_CONFIG = [c for c in CELL_FIELDS if c not in NOT_CONFIG and c not in KEY_CONFIG]
GROUP = ["suite", "group_id"]


def varying(rows: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value (nulls count as a value) in `rows`."""
    return [c for c in columns if c in rows and rows[c].astype(str).nunique(dropna=False) > 1]


def config_columns(rows: pd.DataFrame) -> list[str]:
    """The key axes, plus every other config field that varies in the data (the suite, when several)."""
    suite = ["suite"] if rows["suite"].nunique() > 1 else []
    return suite + KEY_CONFIG + varying(rows, OTHER_CONFIG)


def config_label(row: pd.Series, extra: list[str]) -> str:
    """A short human name for a config: 'resnet18 r224 bs64 freeze=all optimizer=adamw'."""
    parts = [str(row["model"]), f"r{_int(row['resolution'])}", f"bs{_int(row['batch_size'])}", f"freeze={row['freeze']}"]
    parts += [f"{c}={row[c]}" for c in extra if c not in KEY_CONFIG and c != "suite"]
    return " ".join(parts)


def _int(value: object) -> str:
    return "?" if pd.isna(value) else str(int(value))


def freeze_key(label: object) -> tuple[int, float, str]:
    """Order freeze depths from least to most frozen: none, fractions, last-n (larger n first), all."""
    text = str(label)
    if text == "none":
        return (0, 0.0, text)
    if text == "all":
        return (3, 0.0, text)
    if text.lstrip("-").isdigit():
        return (2, -float(text), text)
    try:
        return (1, float(text), text)
    except ValueError:
        return (4, 0.0, text)


def leaderboard(rows: pd.DataFrame, config: list[str]) -> pd.DataFrame:
    """One row per config (suite, group_id) with seeds folded into mean, std and n; best top1 first."""
    aggs = {c: (c, "first") for c in config if c not in GROUP}
    aggs |= {
        "n": ("cell_id", "count"), "top1_mean": ("top1", "mean"), "top1_std": ("top1", "std"),
        "top5_mean": ("top5", "mean"), "train_s_mean": ("train_s", "mean"), "train_s_std": ("train_s", "std"),
        "images_per_s_mean": ("images_per_s", "mean"),
        # Peaks: the worst seed is what a user must provision for.
        "peak_vram_allocated_bytes": ("peak_vram_allocated_bytes", "max"),
        "peak_host_rss_bytes": ("peak_host_rss_bytes", "max"),
        "trainable_params": ("trainable_params", "first"), "total_params": ("total_params", "first"),
        "flops_per_image": ("flops_per_image", "first"),
        "cell_ids": ("cell_id", lambda ids: ", ".join(sorted(ids))),
    }
    table = _fold(rows, aggs)
    ordered = table.sort_values(["top1_mean", "train_s_mean"], ascending=[False, True], na_position="last", kind="stable")
    return ordered.reset_index(drop=True)


def speed_table(rows: pd.DataFrame, config: list[str]) -> pd.DataFrame:
    """Throughput-mode cells (no accuracy): one row per config, fastest first."""
    aggs = {c: (c, "first") for c in config if c not in GROUP}
    aggs |= {
        "n": ("cell_id", "count"), "images_per_s_mean": ("images_per_s", "mean"),
        "images_per_s_std": ("images_per_s", "std"), "warmup_s_mean": ("warmup_s", "mean"),
        "peak_vram_allocated_bytes": ("peak_vram_allocated_bytes", "max"),
        "peak_host_rss_bytes": ("peak_host_rss_bytes", "max"), "flops_per_image": ("flops_per_image", "first"),
    }
    table = _fold(rows, aggs)
    return table.sort_values("images_per_s_mean", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _fold(rows: pd.DataFrame, aggs: dict[str, tuple]) -> pd.DataFrame:
    """Group the seeds of each config; with no rows, an empty frame that still has every column."""
    if rows.empty:
        return pd.DataFrame(columns=GROUP + list(aggs))
    return rows.groupby(GROUP, sort=False, dropna=False).agg(**aggs).reset_index()


def best_per(groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The best config (highest mean top1) for each combination of `keys`: one line per model in a plot."""
    ranked = groups.dropna(subset=["top1_mean"]).sort_values("top1_mean", ascending=False, kind="stable")
    return ranked.drop_duplicates(keys).reset_index(drop=True)


@dataclass(frozen=True)
class PivotSpec:
    """One pivot: `value` aggregated by `agg` over the other axes, `index` down, `columns` across."""

    key: str
    title: str
    index: str
    columns: str
    value: str
    agg: str
    unit: str  # how fmt renders the value: pct, seconds, bytes, rate


# The pivot registry, in report order. Accuracy takes the best config over the other axes (what a user picks);
# time is a mean over them; memory the largest peak (what a user must provision for).
PIVOTS = (
    PivotSpec("top1_model_resolution", "Test top-1 (%) by model and resolution", "model", "resolution",
              "top1_mean", "max", "pct"),
    PivotSpec("top1_model_freeze", "Test top-1 (%) by model and freeze depth", "model", "freeze", "top1_mean", "max", "pct"),
    PivotSpec("train_s_model_batch", "Train time by model and batch size", "model", "batch_size",
              "train_s_mean", "mean", "seconds"),
    PivotSpec("ips_model_batch", "Images/s by model and batch size", "model", "batch_size",
              "images_per_s_mean", "mean", "rate"),
    PivotSpec("vram_model_batch", "Peak VRAM by model and batch size", "model", "batch_size",
              "peak_vram_allocated_bytes", "max", "bytes"),
)


def pivot(groups: pd.DataFrame, spec: PivotSpec) -> pd.DataFrame:
    """The pivot of leaderboard rows; empty when the value was never measured."""
    data = groups.dropna(subset=[spec.value])
    if data.empty:
        return pd.DataFrame()
    table = data.pivot_table(index=spec.index, columns=spec.columns, values=spec.value, aggfunc=spec.agg, observed=True)
    if spec.columns == "freeze":
        table = table[sorted(table.columns, key=freeze_key)]
    return table.sort_index()


def pareto_front(cost: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (cost <= and gain >=, one strictly); NaN points never are."""
    cost, gain = np.asarray(cost, dtype=float), np.asarray(gain, dtype=float)
    valid = ~(np.isnan(cost) | np.isnan(gain))
    front = np.zeros(len(cost), dtype=bool)
    for i in np.flatnonzero(valid):
        better = valid & (cost <= cost[i]) & (gain >= gain[i]) & ((cost < cost[i]) | (gain > gain[i]))
        front[i] = not better.any()
    return front


def pareto_rows(groups: pd.DataFrame) -> pd.DataFrame:
    """The configs on the accuracy / train-time front, fastest first, numbered 1.. as the plot labels them."""
    g = groups.dropna(subset=["top1_mean", "train_s_mean"])
    front = g[pareto_front(g["train_s_mean"].to_numpy(dtype=float), g["top1_mean"].to_numpy(dtype=float))]
    front = front.sort_values(["train_s_mean", "top1_mean"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return front.assign(front_no=range(1, len(front) + 1))

