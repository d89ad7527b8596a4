"""Which config to pick: the best by validation, and the cheapest to train, fastest to serve and smallest within
a margin of it, among the configs that meet the user's budget.

Everything here chooses among the leaderboard's rows (each backbone config at the tuned values validation chose)
by validation accuracy, the mean over seeds of `val_top1_tested`; test accuracy is carried along and never decides.
Functions take and return raw values (fractions, seconds, bytes); the report's text is made in `advice`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.errors import ReportError
from bench.report import stats

_EPS = 1e-9  # a margin of exactly 1 pt must not flip on float rounding


@dataclass(frozen=True)
class Budget:
    """The user's limits (None: no limit) and the margin, in accuracy points, a cheaper pick may lose."""

    within_pts: float = 1.0
    max_vram_bytes: int | None = None
    max_latency_ms: float | None = None
    max_train_hours: float | None = None

    def limits(self) -> list[tuple[Limit, float]]:
        return [(limit, getattr(self, limit.option)) for limit in LIMITS if getattr(self, limit.option) is not None]


@dataclass(frozen=True)
class Limit:
    option: str  # the Budget field
    flag: str  # the command-line option
    column: str  # the leaderboard column it bounds
    what: str  # words for the report


# The budget registry: each limit bounds one leaderboard column; a config whose value was not recorded cannot be
# shown to meet it, so it does not. VRAM is what the card must hold: the cell's process as NVML saw it (CUDA context
# and allocator reserve included), the allocator's training peak for rows from before that was recorded
# (`tables.MEMORY_AGGS`; the report says which configs those are).
LIMITS = (
    Limit("max_vram_bytes", "--max-vram", "vram_card_bytes", "VRAM on the card"),
    Limit("max_latency_ms", "--max-latency-ms", "infer_latency_ms_p50", "latency at batch 1 (median)"),
    Limit("max_train_hours", "--max-train-hours", "train_hours", "train time"),
)


@dataclass(frozen=True)
class Question:
    key: str
    title: str
    needs: str  # the column a config must have recorded to answer it
    order: tuple[tuple[str, bool], ...]  # (column, ascending), most important first; validation breaks ties


# The questions the report answers, in its order. "best" chooses among every config that meets the budget; the
# others among those within `within_pts` of it on validation.
QUESTIONS = (
    Question("best", "best accuracy", "val_mean", (("val_mean", False), ("train_s_mean", True))),
    Question("cheapest", "cheapest to train", "train_s_mean", (("train_s_mean", True), ("val_mean", False))),
    Question("fastest", "fastest to serve", "infer_latency_ms_p50",
             (("infer_latency_ms_p50", True), ("infer_images_per_s", False), ("val_mean", False))),
    Question("smallest", "smallest", "total_params",
             (("total_params", True), ("model_bytes", True), ("peak_vram_train_bytes", True), ("val_mean", False))),
)


@dataclass(frozen=True)
class Advice:
    """The answers: `picks` has one leaderboard row per answered question (column `question`), `ties` the configs
    not significantly worse than the best pick (column `tie_rule` says by which rule), `unanswered` why a question
    has no answer. When nothing meets the budget, `closest` is the config that misses it by the least."""

    budget: Budget
    ranked: int  # configs with validation accuracy
    eligible: int  # of those, the ones that meet the budget
    picks: pd.DataFrame
    ties: pd.DataFrame
    unanswered: dict[str, str] = field(default_factory=dict)
    closest: pd.Series | None = None
    excess: dict[str, float] = field(default_factory=dict)  # closest's value / limit, per Limit.option
    unknown: list[str] = field(default_factory=list)  # budgeted columns no ranked config recorded

    @property
    def best(self) -> pd.Series | None:
        chosen = self.picks[self.picks["question"] == "best"]
        return chosen.iloc[0] if len(chosen) else None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "--max-vram") -> int:
    """'8GiB', '512MiB', '8GB', '1.5 GiB' -> bytes (KiB/MiB/GiB are powers of 2, kB/MB/GB of 10)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ReportError(f"{option} {text!r} is not a size; write a number and a unit, e.g. 8GiB, 512MiB or 8GB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ReportError(f"{option} {text!r} must be more than zero; e.g. 8GiB")
    return int(value)


def meets(board: pd.DataFrame, budget: Budget) -> np.ndarray:
    """True for the rows that meet every limit of the budget (a value not recorded does not)."""
    ok = np.ones(len(board), dtype=bool)
    for limit, value in budget.limits():
        values = pd.to_numeric(board[limit.column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        ok &= values <= value + _EPS * max(1.0, value)  # NaN: not recorded, not met
    return ok


def advise(board: pd.DataFrame, trained: pd.DataFrame, budget: Budget) -> Advice:
    """Answer every question from the leaderboard (ranked by validation) within the budget."""
    ranked = board[board["rank"].notna()].reset_index(drop=True)
    eligible = ranked[meets(ranked, budget)].reset_index(drop=True)
    empty = board.iloc[0:0].assign(question=pd.Series(dtype=object))
    if eligible.empty:
        closest, excess, unknown = _closest(ranked, budget)
        return Advice(budget, len(ranked), 0, empty, empty.assign(tie_rule=pd.Series(dtype=object)),
                      closest=closest, excess=excess, unknown=unknown)
    best = eligible.iloc[0]
    near = eligible[eligible["val_mean"] >= best["val_mean"] - budget.within_pts / 100 - _EPS]
    picks, unanswered = [], {}
    for question in QUESTIONS:
        pool = eligible.iloc[:1] if question.key == "best" else near
        pool = pool[pool[question.needs].notna()]
        if pool.empty:
            unanswered[question.key] = f"no config within the margin recorded {question.needs}"
            continue
        columns, ascending = zip(*question.order)
        chosen = pool.sort_values(list(columns), ascending=list(ascending), na_position="last", kind="stable")
        picks.append(chosen.iloc[[0]].assign(question=question.key))
    return Advice(budget, len(ranked), len(eligible), pd.concat(picks, ignore_index=True),
                  _ties(board, eligible, trained), unanswered)


def _ties(board: pd.DataFrame, eligible: pd.DataFrame, trained: pd.DataFrame) -> pd.DataFrame:
    """The eligible configs not significantly worse than the best eligible one: by the leaderboard's McNemar mark
    when that best is #1 (else the test is run again against it), and within one standard deviation over seeds
    (the larger of the two configs') where no paired test data exist."""
    if int(eligible["rank"].iloc[0]) == 1:
        marked = eligible
    else:  # the budget left #1 out: compare with the best that meets it, Holm over the configs compared now
        marked = stats.versus_best(eligible.assign(rank=pd.array(range(1, len(eligible) + 1), dtype="Int64")), trained)
    best = marked.iloc[0]
    spread = np.fmax(marked["val_std"].to_numpy(dtype=float), float(best["val_std"]) if pd.notna(best["val_std"]) else np.nan)
    close = (best["val_mean"] - marked["val_mean"]).to_numpy(dtype=float) <= np.nan_to_num(spread) + _EPS
    by_test = marked["vs_best"] == "≈ best"
    by_std = (marked["vs_best"] == "") & close & ~np.isnan(spread)
    rule = np.where(by_test, "McNemar", np.where(by_std, "one std", ""))
    ties = marked.assign(tie_rule=rule)
    return ties[(ties.index > 0) & (ties["tie_rule"] != "")].reset_index(drop=True)


def _closest(ranked: pd.DataFrame, budget: Budget) -> tuple[pd.Series | None, dict[str, float], list[str]]:
    """The config that misses the budget by the smallest factor (its worst value / limit), and the budgeted
    columns no ranked config recorded (nothing can be said to meet those)."""
    limits = budget.limits()
    unknown = [limit.column for limit, _ in limits if ranked.empty or ranked[limit.column].isna().all()]
    known = [(limit, value) for limit, value in limits if limit.column not in unknown]
    rows = ranked.dropna(subset=[limit.column for limit, _ in known])
    if rows.empty or not known:
        return None, {}, unknown
    ratios = pd.DataFrame({limit.option: rows[limit.column].astype(float) / value for limit, value in known})
    worst = ratios.max(axis=1)
    i = int(np.lexsort((-rows["val_mean"].to_numpy(dtype=float), worst.to_numpy()))[0])
    return rows.iloc[i], ratios.iloc[i].to_dict(), unknown
