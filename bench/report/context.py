"""Everything one report is built from, derived once from a `Selection`: the sections and plots only read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import seaborn as sns

from bench.report import stats, tables
from bench.report.history import judge
from bench.report.recommend import Advice, Budget, advise
from bench.report.select import Selection


@dataclass(frozen=True)
class ReportData:
    current: pd.DataFrame  # every shown cell (one row each), whatever its status or mode
    trained: pd.DataFrame  # status ok, mode train: the cells with an accuracy
    failed: pd.DataFrame  # status != ok
    configs: pd.DataFrame  # every config, seeds folded (a sweep's values each a row), ordered by validation
    # The leaderboard: one row per backbone config at the tuned values validation chose (`tables.fold_sweeps`),
    # ranked by validation, with test accuracy, time, memory and the McNemar mark against #1 (`stats.versus_best`).
    # The chosen-config table other sections (and recommendations) build on.
    leaderboard: pd.DataFrame
    speed: pd.DataFrame  # throughput-mode configs
    epochs: pd.DataFrame  # per-epoch rows of the shown cells
    comparison: pd.DataFrame  # per-config change against `baseline_runs`, seeds folded
    baseline_runs: dict[str, str]
    config: list[str]  # config columns shown in tables
    extra: list[str]  # varying config columns beyond the key axes (they name a config in plots)
    tuned: list[str]  # the TUNED columns that vary: folded in the leaderboard, shown as the chosen values
    palette: dict[str, tuple[float, float, float]]  # model -> colour, the same in every plot
    top1_drop: float
    speed_drop: float
    axes: list[str]  # the config axes that vary among trained configs (beyond model and suite)
    budget: Budget
    advice: Advice  # the recommendations, from the leaderboard within the budget
    # Per suite, how many configs the comparison judged and by which rule (history or one run); and what it could
    # not judge (images/s across GPUs or library versions). From `history.judge`.
    comparison_rules: list[str] = field(default_factory=list)
    comparison_notes: list[str] = field(default_factory=list)


def model_palette(models: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per model for every plot; colour-blind safe while there are few enough models."""
    names = sorted(set(models))
    colours = sns.color_palette("colorblind" if len(names) <= 10 else "husl", max(len(names), 1))
    return dict(zip(names, colours))


def make_context(selection: Selection, *, top1_drop: float, speed_drop: float,
                 budget: Budget | None = None, history: pd.DataFrame | None = None) -> ReportData:
    """Everything the sections read; `history` (the suites' earlier runs, `history.history_rows`) lets the
    comparison judge configs against their history; None compares with `selection.baseline` alone."""
    current = selection.current
    ok = current["status"] == "ok"
    throughput = current["mode"] == "throughput"
    trained, speed_rows = current[ok & ~throughput], current[ok & throughput]
    config = tables.config_columns(current)
    extra = [c for c in config if c not in tables.KEY_CONFIG and c != "suite"]
    configs = tables.config_table(trained, config)
    names = tables.weights_names(configs["weights"]) if "weights" in configs else None
    configs["label"] = [tables.config_label(r, extra, names) for _, r in configs.iterrows()]
    configs["backbone_label"] = [tables.config_label(r, [c for c in extra if c not in tables.TUNED], names)
                                 for _, r in configs.iterrows()]
    # A config whose seeds partly failed shows it next to n, so a mean over fewer seeds is not mistaken for all.
    failed = current[~ok].groupby(tables.GROUP).size().rename("n_failed")
    configs = configs.join(failed, on=tables.GROUP).fillna({"n_failed": 0}).astype({"n_failed": int})
    leaderboard = stats.versus_best(tables.fold_sweeps(configs, config), trained)
    budget = budget or Budget()
    judgement = judge(current, selection.baseline, history, extra, top1_drop=top1_drop, speed_drop=speed_drop)
    return ReportData(
        current=current, trained=trained, failed=current[~ok], configs=configs, leaderboard=leaderboard,
        speed=tables.speed_table(speed_rows, config), epochs=selection.epochs,
        comparison=judgement.comparison, comparison_rules=judgement.rules, comparison_notes=judgement.notes,
        baseline_runs=selection.baseline_runs, config=config, extra=extra,
        tuned=[c for c in config if c in tables.TUNED],
        palette=model_palette(list(current["model"].dropna().astype(str))),
        top1_drop=top1_drop, speed_drop=speed_drop, axes=tables.axes(configs, config), budget=budget,
        advice=advise(leaderboard, trained, budget),
    )
