"""The report's numbers: seeds folded into one row per config, sweeps folded into one row per backbone config,
pivots, the Pareto front.

Every choice made here (the leaderboard's order, the value a sweep keeps, the best config per point of a pivot
or plot, the Pareto front) uses validation accuracy, the mean over seeds of `val_top1_tested`: the validation score of the weights the
test score was measured on (the best epoch's with `restore_best`, the last epoch's without). Test accuracy is carried along for the chosen rows and
never decides anything: with hundreds of configs, picking by test is how a test set gets overfit.
A config without validation accuracy (val_fraction 0) cannot be chosen; it is listed after the ranked ones.

Functions here take and return DataFrames of raw values (fractions, seconds, bytes); `fmt` turns them
into text. Tests check these numbers against the rows they wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import pandas as pd

from bench import status
from bench.result import PARTS
from bench.suite import CELL_FIELDS, TUNED_FIELDS, Cell

# Always shown: the axes a transfer-learning grid is usually built from.
KEY_CONFIG = ["model", "resolution", "batch_size", "freeze"]
# Never config columns: identity, the seed (folded), and how-to-run fields that do not change results.
NOT_CONFIG = {"suite", "seed", "cell_timeout_s", "mode", "throughput_warmup_steps", "throughput_steps",
              # rows hold the resolved recipe (lists) under the cell's override fields' names: derived, not chosen
              "input_mean", "input_std"}
OTHER_CONFIG = [c for c in CELL_FIELDS if c not in NOT_CONFIG and c not in KEY_CONFIG]
GROUP = ["suite", "group_id"]
# Hyperparameters a suite sweeps to tune a backbone, not axes a user compares. A sweep over them folds into one
# leaderboard row per backbone config, at the values validation chose, so each backbone is compared at its own
# best setting: with one fixed learning rate the ranking partly measures how well that rate suits each
# architecture. (`lr` on rows is the rate actually used, so a probe's x10 default lands in its own fold.)
TUNED = TUNED_FIELDS


# Config fields a run resolves (`precision: auto` becomes bf16, `lr: null` the default rate): a finished row holds
# the value used, a failed one mostly the cell's own, whose `auto`, True or null is no setting of its own.
RESOLVED = frozenset().union(*(part.RESOLVES for part in PARTS.values()))
FINISHED = (status.OK, status.DROPPED)  # statuses whose rows hold the resolved values (a race's dropped ones do)
_DEFAULTS = {c: Cell.model_fields[c].default for c in RESOLVED if c in Cell.model_fields}


def varying(rows: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that take more than one value (nulls count as a value) in `rows`, a resolved field's compared
    like with like (`compared`)."""
    return [c for c in columns if c in rows and compared(rows, c).astype(str).nunique(dropna=False) > 1]


def compared(rows: pd.DataFrame, column: str) -> pd.Series:
    """The values of `column` that say which setting a row ran with. For a field the run resolves, a failed row's
    placeholder (`auto`, null, or the cell's default, such as cudnn_benchmark True) is left out while some row
    finished: it is the setting as written, not the one used. A value the suite wrote out (lr 0.1) still counts."""
    values = rows[column]
    if column not in RESOLVED or "status" not in rows:
        return values
    finished = rows["status"].isin(FINISHED)
    if not finished.any():  # every value as written: like with like
        return values
    placeholder = values.map(lambda v: _placeholder(column, v)).astype(bool)
    return values[finished | ~placeholder]


def _placeholder(column: str, value: object) -> bool:
    if isinstance(value, np.generic):  # a numpy bool or number, as pandas hands them out
        value = value.item()
    if _missing(value):
        return True
    if not isinstance(value, (str, bool, int, float)):  # a list (an input recipe): written out, not a placeholder
        return False
    return value == "auto" or (type(value) is type(_DEFAULTS.get(column)) and value == _DEFAULTS[column])


def config_columns(rows: pd.DataFrame) -> list[str]:
    """The key axes, plus every other config field that varies in the data (the suite, when several)."""
    suite = ["suite"] if rows["suite"].nunique() > 1 else []
    return suite + KEY_CONFIG + varying(rows, OTHER_CONFIG)


def config_label(row: pd.Series, extra: list[str], weights: Mapping[str, str] | None = None) -> str:
    """A short human name for a config: 'resnet18 r224 bs64 freeze=all optimizer=adamw'; `weights` names the
    weights files shorter (`weights_names`)."""
    parts = [str(row["model"]), f"r{_int(row['resolution'])}", f"bs{_int(row['batch_size'])}", f"freeze={row['freeze']}"]
    parts += [f"{c}={_value_label(row[c], c, weights)}" for c in extra if c not in KEY_CONFIG and c != "suite"]
    return " ".join(parts)


def weights_names(values: Iterable[object]) -> dict[str, str]:
    """Each weights file by its file name where the names tell the files apart (a folder of temporary or cache
    paths says nothing in a legend), by its whole path where two share a name; the leaderboard's column keeps
    the paths."""
    paths = {str(v) for v in values if not _missing(v)}
    names = {path: PurePath(path).name or path for path in paths}
    return names if len(set(names.values())) == len(names) else {path: path for path in paths}


def _value_label(value: object, axis: str, weights: Mapping[str, str] | None = None) -> str:
    """One config value as the axis labels show it: `steps=no cap`, not `steps=<NA>`; `4`, not `4.0`."""
    if _missing(value):
        return UNSET.get(axis, "unset")
    if axis == "weights" and weights:
        return weights.get(str(value), str(value))
    return _label(value)


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


def config_table(rows: pd.DataFrame, config: list[str]) -> pd.DataFrame:
    """One row per config (suite, group_id), seeds folded into mean, std and n; ordered `by_validation`."""
    aggs = {c: (c, "first") for c in config if c not in GROUP}
    aggs |= {
        "n": ("cell_id", "count"), "n_val": ("val_top1_tested", "count"),
        "val_mean": ("val_top1_tested", "mean"), "val_std": ("val_top1_tested", "std"),
        "top1_mean": ("top1", "mean"), "top1_std": ("top1", "std"),
        "top5_mean": ("top5", "mean"), "train_s_mean": ("train_s", "mean"), "train_s_std": ("train_s", "std"),
        "images_per_s_mean": ("images_per_s", "mean"),
        # Peaks: the worst seed is what a user must provision for.
        "peak_vram_allocated_bytes": ("peak_vram_allocated_bytes", "max"),
        "peak_vram_train_bytes": ("peak_vram_train_bytes", "max"), "data_device_bytes": ("data_device_bytes", "max"),
        "peak_host_rss_bytes": ("peak_host_rss_bytes", "max"),
        "peak_vram_process_bytes": ("peak_vram_process_bytes", "max"),
        **MEMORY_AGGS, "concurrent_cells": ("concurrent_cells", "max"),
        "trainable_params": ("trainable_params", "first"), "total_params": ("total_params", "first"),
        "flops_per_image": ("flops_per_image", "first"), "train_images": ("train_images", "first"),
        # Serving cost, measured on each trained cell: rates and latencies are means over seeds, bytes the largest.
        "infer_images_per_s": ("infer_images_per_s", "mean"),
        "infer_latency_ms_p50": ("infer_latency_ms_p50", "mean"),
        "infer_latency_ms_p95": ("infer_latency_ms_p95", "mean"),
        "infer_peak_vram_bytes": ("infer_peak_vram_bytes", "max"), "model_bytes": ("model_bytes", "max"),
        "on_gpu": ("_on_gpu", "max"),
        "gpu_name": ("gpu_name", "first"),
        "cell_ids": ("cell_id", lambda ids: ", ".join(sorted(ids))),
    }
    on_gpu = rows["device"].astype(str).str.startswith("cuda") | rows["gpu_name"].notna()
    configs = _fold(with_memory(rows).assign(_on_gpu=on_gpu), aggs)
    # One cell holds one device for its train time: device-hours are GPU-hours on a GPU, CPU-hours on a CPU.
    configs["train_hours"] = configs["train_s_mean"].astype(float) / 3600
    configs["train_device"] = np.where(configs["on_gpu"].astype(bool), "GPU", "CPU")
    return by_validation(configs.drop(columns="on_gpu"))


# The memory a user meets, one figure each, per config the worst seed: host RAM is the process tree's PSS (shared
# pages counted once), RSS only for rows from before PSS was recorded; VRAM is what the cell's process held on its
# GPU (NVML, per process: CUDA context and allocator reserve included), the allocator's training peak for rows from
# before that was recorded. The *_fallback columns say a config's figure came from the older column.
MEMORY_AGGS = {
    "peak_host_bytes": ("_host", "max"), "host_rss_fallback": ("_host_rss", "max"),
    "vram_card_bytes": ("_vram_card", "max"), "vram_allocator_fallback": ("_vram_allocator", "max"),
}


def with_memory(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with the per-row figures MEMORY_AGGS folds: host RAM (PSS, else RSS), VRAM on the card (the
    process's, else the allocator's training peak), and whether each came from the older column."""
    pss, rss = rows["peak_host_pss_bytes"], rows["peak_host_rss_bytes"]
    process, train = rows["peak_vram_process_bytes"], rows["peak_vram_train_bytes"]
    return rows.assign(_host=pss.fillna(rss), _host_rss=pss.isna() & rss.notna(),
                       _vram_card=process.fillna(train), _vram_allocator=process.isna() & train.notna())


def shared_host(rows: pd.DataFrame) -> pd.Series:
    """True for rows (or configs) whose cell ran beside other cells on its host: their times are not a cell's alone."""
    return pd.to_numeric(rows["concurrent_cells"], errors="coerce").fillna(1) > 1


def by_validation(configs: pd.DataFrame) -> pd.DataFrame:
    """Configs with validation accuracy first, highest mean first (ties: shorter train time); then the ones
    without it, in config order: they cannot be ranked, and ranking them by test would be choosing on test."""
    val = configs["val_mean"].to_numpy(dtype=float)
    time = configs["train_s_mean"].to_numpy(dtype=float)
    column = {c: configs[c].tolist() if c in configs else [None] * len(configs) for c in _ORDER}

    def key(i: int) -> tuple:
        if not np.isnan(val[i]):  # ranked: (0, ...) always sorts before unranked: (1, ...)
            return (0, -val[i], np.inf if np.isnan(time[i]) else time[i], i)
        return (1, str(column["suite"][i]), str(column["model"][i]), _num(column["resolution"][i]),
                _num(column["batch_size"][i]), freeze_key(column["freeze"][i]),
                *(_num(column[c][i]) for c in TUNED), str(column["group_id"][i]))

    return configs.iloc[sorted(range(len(configs)), key=key)].reset_index(drop=True)


_ORDER = ("suite", "model", "resolution", "batch_size", "freeze", *TUNED, "group_id")


def _num(value: object) -> float:
    return float("inf") if value is None or pd.isna(value) else float(value)


def _folds(ordered: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Which fold (combination of `keys`) each row belongs to, numbered in order of first appearance."""
    if not keys:
        return pd.Series(0, index=ordered.index)
    return ordered.groupby(keys, sort=False, dropna=False).ngroup()


def fold_sweeps(configs: pd.DataFrame, config: list[str]) -> pd.DataFrame:
    """The leaderboard: one row per backbone config (the config columns but the TUNED ones), the tuned values
    validation chose; `tried` says how many were tried and `candidates` their group ids, best first.

    Without validation accuracy nothing can choose among a sweep's values, so each stays a row of its own
    (tried 1). The rows come `by_validation`, and `rank` numbers the ones with validation accuracy."""
    ordered = by_validation(configs)
    fold = _folds(ordered, ["suite"] + [c for c in config if c not in TUNED and c not in GROUP])
    # Ordered by validation, a fold's first row has validation accuracy exactly when any of its rows has.
    validated = ordered["val_mean"].notna().groupby(fold).transform("first").astype(bool)
    tried = ordered["group_id"].groupby(fold).agg(list)
    keep = ~fold.duplicated() | ~validated
    kept = zip(fold[keep], validated[keep], ordered.loc[keep, "group_id"])
    board = ordered[keep].assign(candidates=[tried[f] if v else [g] for f, v, g in kept])
    board["tried"] = [len(c) for c in board["candidates"]]
    ranked = int(board["val_mean"].notna().sum())
    rank = pd.array(list(range(1, ranked + 1)) + [pd.NA] * (len(board) - ranked), dtype="Int64")
    return board.reset_index(drop=True).assign(rank=rank)


def speed_table(rows: pd.DataFrame, config: list[str]) -> pd.DataFrame:
    """Throughput-mode cells (no accuracy): one row per config, fastest first."""
    aggs = {c: (c, "first") for c in config if c not in GROUP}
    aggs |= {
        "n": ("cell_id", "count"), "images_per_s_mean": ("images_per_s", "mean"),
        "images_per_s_std": ("images_per_s", "std"), "warmup_s_mean": ("warmup_s", "mean"),
        "peak_vram_allocated_bytes": ("peak_vram_allocated_bytes", "max"),
        "peak_vram_process_bytes": ("peak_vram_process_bytes", "max"), **MEMORY_AGGS,
        "concurrent_cells": ("concurrent_cells", "max"),
        "peak_host_rss_bytes": ("peak_host_rss_bytes", "max"), "flops_per_image": ("flops_per_image", "first"),
    }
    table = _fold(with_memory(rows), aggs)
    return table.sort_values("images_per_s_mean", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _fold(rows: pd.DataFrame, aggs: dict[str, tuple]) -> pd.DataFrame:
    """Group the seeds of each config; with no rows, an empty frame that still has every column."""
    if rows.empty:
        return pd.DataFrame(columns=GROUP + list(aggs))
    return rows.groupby(GROUP, sort=False, dropna=False).agg(**aggs).reset_index()


def best_per(configs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The config with the best validation mean for each combination of `keys` (one line per model in a plot).

    A combination whose only config lacks validation accuracy keeps it (there is no choice to make); one with
    several such configs and none validated gets no row: choosing among them would mean choosing on test."""
    ordered = by_validation(configs)
    fold = _folds(ordered, keys)
    alone = fold.map(fold.value_counts()) == 1
    return ordered[~fold.duplicated() & (ordered["val_mean"].notna() | alone)].reset_index(drop=True)


@dataclass(frozen=True)
class PivotSpec:
    """One pivot: `value` aggregated by `agg` over the other axes, `index` down, `columns` across.

    agg "chosen": the value of the config `best_per` chooses (by validation) for each index and column."""

    key: str
    title: str
    index: str
    columns: str
    value: str
    agg: str
    unit: str  # how fmt renders the value: pct, seconds, bytes, rate


# The fixed pivots of cost by batch size. Time is a mean over the other settings; memory the largest peak (what a
# user must provision for). Accuracy pivots are made per axis that varies (`accuracy_pivots`).
PIVOTS = (
    PivotSpec("train_s_model_batch", "Train time by model and batch size", "model", "batch_size",
              "train_s_mean", "mean", "seconds"),
    PivotSpec("ips_model_batch", "Images/s by model and batch size", "model", "batch_size",
              "images_per_s_mean", "mean", "rate"),
    PivotSpec("vram_model_batch", "Peak VRAM by model and batch size", "model", "batch_size",
              "peak_vram_allocated_bytes", "max", "bytes"),
)


def axes(configs: pd.DataFrame, config: list[str]) -> list[str]:
    """The config axes a report shows accuracy along: every config column but suite and model that varies."""
    return varying(configs, [c for c in config if c not in ("suite", "model")])


def accuracy_pivots(axes: list[str]) -> list[PivotSpec]:
    """One pivot per axis: the test top-1 of the config validation chooses over the other axes (what a user
    would pick), by model and that axis."""
    return [PivotSpec(f"top1_model_{a}", f"Test top-1 (%) by model and {a}, config chosen by validation",
                      "model", a, "top1_mean", "chosen", "pct") for a in axes]


# What an unset axis value means, for the axes where it means something ("all" the training images).
UNSET = {"train_subset": "all", "test_subset": "all", "steps": "no cap", "target_top1": "none", "weights": "default"}


def axis_labels(values: pd.Series, axis: str) -> tuple[pd.Series, list[str]]:
    """An axis's values as text labels (an unset value named, never dropped), and their order: freeze depths
    from none to all, numbers by value, then text, unset last."""
    unset = UNSET.get(axis, "unset")
    names = weights_names(values) if axis == "weights" else None
    labels = pd.Series([_value_label(v, axis, names) for v in values], index=values.index, dtype=object)
    firsts = dict(zip(labels, values))

    def key(label: str) -> tuple:
        if label == unset and _missing(firsts[label]):
            return (3, 0.0, label)
        if axis == "freeze":
            return (0, *freeze_key(label))
        try:
            return (1, float(firsts[label]), label)
        except (TypeError, ValueError):
            return (2, 0.0, label)

    return labels, sorted(set(labels), key=key)


def _missing(value: object) -> bool:
    return value is None or (not isinstance(value, (list, tuple, np.ndarray)) and bool(pd.isna(value)))


def _label(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pivot(configs: pd.DataFrame, spec: PivotSpec) -> pd.DataFrame:
    """The pivot of config rows; empty when the value was never measured."""
    chosen = spec.agg == "chosen"
    data = (best_per(configs, [spec.index, spec.columns]) if chosen else configs).dropna(subset=[spec.value])
    if data.empty:
        return pd.DataFrame()
    labels, order = axis_labels(data[spec.columns], spec.columns)
    table = data.assign(**{spec.columns: labels}).pivot_table(
        index=spec.index, columns=spec.columns, values=spec.value, aggfunc="first" if chosen else spec.agg,
        observed=True)
    return table[[c for c in order if c in table.columns]].sort_index()


def pareto_front(cost: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (cost <= and gain >=, one strictly); NaN points never are."""
    cost, gain = np.asarray(cost, dtype=float), np.asarray(gain, dtype=float)
    valid = ~(np.isnan(cost) | np.isnan(gain))
    front = np.zeros(len(cost), dtype=bool)
    for i in np.flatnonzero(valid):
        better = valid & (cost <= cost[i]) & (gain >= gain[i]) & ((cost < cost[i]) | (gain > gain[i]))
        front[i] = not better.any()
    return front


def pareto_rows(configs: pd.DataFrame, cost: str = "train_s_mean") -> pd.DataFrame:
    """The configs on the validation-accuracy / `cost` front, cheapest first, numbered 1.. as the plot labels
    them. The front is a choice, so validation draws it; configs without validation accuracy are not on it."""
    g = configs.dropna(subset=["val_mean", cost])
    front = g[pareto_front(g[cost].to_numpy(dtype=float), g["val_mean"].to_numpy(dtype=float))]
    front = front.sort_values([cost, "val_mean"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return front.assign(front_no=range(1, len(front) + 1))

