"""Per class, for the recommended config: its seeds' confusion matrices summed, and the classes it gets most wrong."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report import tables
from bench.report.context import ReportData


def focus(data: ReportData) -> tuple[pd.Series | None, str]:
    """The config the per-class view is about, and why: the best pick within the budget; where nothing meets
    the budget, the leaderboard's #1 (or its only config, when none has validation accuracy to choose by)."""
    if data.advice.best is not None:
        return data.advice.best, "the best pick"
    chosen = tables.best_per(data.leaderboard, [])
    if chosen.empty:
        return None, ""
    row = chosen.iloc[0]
    return row, ("#1 by validation (nothing meets the budget)" if pd.notna(row["rank"])
                 else "the only config (no validation accuracy to choose by)")


@dataclass(frozen=True)
class Classes:
    config: pd.Series
    why: str
    seeds: int  # matrices summed
    names: list[str]
    matrix: np.ndarray  # counts, rows: true class, summed over seeds


def _class_names(names: object, n: int) -> list[str]:
    """The recorded class names, or 0..n-1 when they are missing or do not match the matrix."""
    if isinstance(names, (list, np.ndarray)) and len(names) == n:
        return [str(c) for c in names]
    return [str(i) for i in range(n)]


def classes(data: ReportData) -> Classes | str:
    """The focus config's seeds' confusion matrices summed (every seed, not the luckiest), or why there are none."""
    config, why = focus(data)
    if config is None:
        return "no config has validation accuracy to choose by"
    seeds = data.trained[(data.trained["suite"] == config["suite"]) & (data.trained["group_id"] == config["group_id"])]
    matrices = [np.array([np.asarray(r, dtype=float) for r in m]) for m in seeds["confusion_matrix"]
                if isinstance(m, (list, np.ndarray)) and len(m) > 0]
    if not matrices:
        return "no confusion matrix recorded for the chosen config"
    if len({m.shape for m in matrices}) > 1 or matrices[0].ndim != 2 or matrices[0].shape[0] != matrices[0].shape[1]:
        return f"the chosen config's confusion matrices are not square and alike ({matrices[0].shape})"
    matrix = np.sum(matrices, axis=0)
    return Classes(config, why, len(matrices), _class_names(seeds["class_names"].iloc[0], len(matrix)), matrix)


def worst(found: Classes, limit: int = 10) -> pd.DataFrame:
    """The classes with the lowest test accuracy (recall, from the summed matrix), each with the class it is most
    often mistaken for and that mistake's share of the class; lowest first, and only classes it gets wrong at all."""
    m = found.matrix
    totals = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(totals > 0, np.diag(m) / totals, np.nan)
    off = m.copy()
    np.fill_diagonal(off, -1)
    confused = off.argmax(axis=1)
    mistakes = off[np.arange(len(m)), confused]
    frame = pd.DataFrame({
        "class": found.names, "top1": recall, "images": totals / found.seeds,
        "mistaken_for": [found.names[j] if mistakes[i] > 0 else "" for i, j in enumerate(confused)],
        "mistaken_share": np.where((totals > 0) & (mistakes > 0), mistakes / np.where(totals > 0, totals, 1), np.nan),
    })
    wrong = frame[~(frame["top1"] >= 1)]  # a class it gets all right is not among the most wrong
    return wrong.sort_values(["top1", "class"], na_position="last", kind="stable").head(limit).reset_index(drop=True)
