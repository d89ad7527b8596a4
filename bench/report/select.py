"""Choosing the rows a report shows: the latest row per cell, one run or one suite, and the run to compare with.

Everything here works on the DataFrames `ResultStore.read()` hands over; no file is opened.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from bench.errors import ResultsError, close_matches
from bench.store import CELL_COLUMNS, CELL_SCHEMA

# Provenance columns shown in the header; rows that disagree on any of them get a visible warning.
MACHINE_COLUMNS = (
    "gpu_name", "driver_version", "cuda_version", "torch_version", "torchvision_version",
    "hostname", "device", "bench_version", "git_commit",
)
KEY = ["suite", "cell_id"]


@dataclass(frozen=True)
class Selection:
    """The rows a report shows (`current`, one per cell) and the earlier rows they are compared with."""

    current: pd.DataFrame
    baseline: pd.DataFrame
    baseline_runs: dict[str, str]  # suite -> run id the comparison uses
    epochs: pd.DataFrame


def normalise(cells: pd.DataFrame) -> pd.DataFrame:
    """Give every schema column its schema dtype, so rows from older or partial files behave alike."""
    df = cells.copy()
    empty = CELL_SCHEMA.empty_table().to_pandas()
    for col, kind in CELL_COLUMNS.items():
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), index=df.index, dtype=empty[col].dtype)
        elif pa.types.is_integer(kind):
            # One file per cell: a column that is null in some files comes back as float; restore integers.
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif pa.types.is_floating(kind):
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["group_id"] = df["group_id"].fillna(df["cell_id"])
    df["mode"] = df["mode"].fillna("train")
    df["freeze"] = df["freeze"].fillna("none")
    df["_when"] = df["finished_at"].fillna(df["started_at"])
    # Rows from before val_top1_tested: the weights tested were the best epoch's where restore_best was on
    # (its default), the last epoch's where it was off.
    restored = df["restore_best"].fillna(True).astype(bool)
    df["val_top1_tested"] = df["val_top1_tested"].fillna(df["val_top1_best"].where(restored, df["val_top1_final"]))
    return df


def latest_per_cell(rows: pd.DataFrame) -> pd.DataFrame:
    """The newest row (by finished_at, then run id) of each cell of each suite: reruns and resumes collapse."""
    ordered = rows.sort_values(["_when", "run_id"], na_position="first", kind="stable")
    return ordered.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def _require(rows: pd.DataFrame, column: str, value: str, what: str, folder: str) -> pd.DataFrame:
    chosen = rows[rows[column] == value]
    if chosen.empty:
        known = sorted(rows[column].dropna().unique())
        raise ResultsError(
            f"no results for {what} {value!r} in {folder}{close_matches(value, known)}; "
            f"pass one of: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''}"
        )
    return chosen


def select_rows(cells: pd.DataFrame, epochs: pd.DataFrame, folder: str, *, run: str | None = None,
                suite: str | None = None, compare: str | None = None) -> Selection:
    """Pick the shown rows (latest per cell, or one run / suite) and the baseline rows of an earlier run."""
    everything = normalise(cells)
    scope = _require(everything, "suite", suite, "suite", folder) if suite else everything
    shown = _require(scope, "run_id", run, "run", folder) if run else scope
    current = latest_per_cell(shown)
    if compare:
        _require(everything, "run_id", compare, "run", folder)
        has = scope.loc[scope["run_id"] == compare, "suite"].unique()
        runs = {s: compare for s in current["suite"].unique() if s in has}
        if not runs:
            raise ResultsError(
                f"run {compare!r} has no rows in suite {', '.join(sorted(current['suite'].unique()))}; "
                "pass --compare a run of the same suite"
            )
    else:
        runs = {s: r for s in current["suite"].unique() if (r := previous_run(scope, current, s))}
    return Selection(current, _baseline_rows(scope, current, runs), runs, _epochs_of(epochs, current))


def previous_run(rows: pd.DataFrame, current: pd.DataFrame, suite: str) -> str | None:
    """The newest run of `suite` that provided none of the current rows, is older than them and shares cells."""
    mine = current[current["suite"] == suite]
    theirs = rows[(rows["suite"] == suite) & ~rows["run_id"].isin(mine["run_id"]) & rows["cell_id"].isin(mine["cell_id"])]
    newest = mine["_when"].max()
    if pd.notna(newest):
        # "Previous" means earlier: with --run on an old run, a newer run is not its baseline.
        theirs = theirs[theirs["_when"].isna() | (theirs["_when"] < newest)]
    if theirs.empty:
        return None
    ends = theirs.groupby("run_id")["_when"].max().sort_index().sort_values(na_position="first", kind="stable")
    return str(ends.index[-1])


def _baseline_rows(rows: pd.DataFrame, current: pd.DataFrame, runs: dict[str, str]) -> pd.DataFrame:
    picked = [rows[(rows["suite"] == s) & (rows["run_id"] == r)] for s, r in runs.items()]
    if not picked:
        return rows.iloc[0:0]
    baseline = latest_per_cell(pd.concat(picked, ignore_index=True))
    # A cell whose current row comes from the baseline run itself has nothing to compare with.
    merged = baseline.merge(current[KEY + ["run_id"]], on=KEY, suffixes=("", "_now"))
    return merged[merged["run_id"] != merged["run_id_now"]].drop(columns="run_id_now").reset_index(drop=True)


def _epochs_of(epochs: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    on = ["suite", "run_id", "cell_id"]
    if epochs.empty or not set(on + ["epoch"]) <= set(epochs.columns):
        return pd.DataFrame(columns=on + ["epoch"])
    keys = current[on].drop_duplicates()
    return epochs.merge(keys, on=on).sort_values(on + ["epoch"]).reset_index(drop=True)


def provenance(current: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """The header's machine fields (value, or every value with its row count) and one warning per mixed field."""
    machine: dict[str, str] = {}
    mixed: list[str] = []
    for col in MACHINE_COLUMNS:
        counts = current[col].dropna().astype(str).value_counts(sort=False).sort_index()
        if len(counts) <= 1:
            machine[col] = counts.index[0] if len(counts) else "unknown"
            continue
        machine[col] = "; ".join(f"{value} ({n} cells)" for value, n in counts.items())
        mixed.append(f"{col}: {machine[col]}")
    if not mixed:
        return machine, []
    warning = (
        "rows come from different machines or library versions, so their times and memory are not "
        "directly comparable: " + " | ".join(mixed)
    )
    return machine, [warning]
