"""The report's comparison section: the shown configs against their own history or the previous run.

The judgement is made in `history` (a config with enough earlier runs, against them) and `compare` (against one
run); here it becomes a table whose title and notes say which rule judged the rows.
"""

from __future__ import annotations

import pandas as pd

from bench.report import fmt, history, stats
from bench.report.compare import PREVIOUS
from bench.report.context import ReportData
from bench.report.fmt import Section


def comparison(data: ReportData) -> Section:
    table = data.comparison
    section = Section("comparison", _title(table))
    if not data.baseline_runs:
        return section.add("note", "No earlier run of these suites shares cells with the shown rows; nothing to compare.")
    if table.empty:
        return section.add("note", f"Compared with {_against(data)}: no cell has rows in both.")
    by_history = _by_history(table)
    judged = [("judged against", _judged_against, False)] if by_history.any() else []
    columns = [
        ("config", lambda r: fmt.text(r["label"]), False), ("seeds", lambda r: fmt.text(r["seeds"]), True), *judged,
        ("top1 % before", lambda r: fmt.pct(r["top1_before"], r["top1_before_std"]), True),
        ("top1 % now", lambda r: fmt.pct(r["top1_after"], r["top1_after_std"]), True),
        ("Δ top1 (pts)", lambda r: fmt.delta_pts(r["top1_delta"]), True),
        ("allowed drop (pts)", lambda r: _allowed(r["top1_allowed"], r["top1_delta"], 2, r["threshold_only"]), True),
        ("images/s before", lambda r: fmt.rate(r["ips_before"]), True),
        ("images/s now", lambda r: fmt.rate(r["ips_after"]), True),
        ("Δ images/s", lambda r: fmt.delta_rel(r["ips_rel"]), True),
        ("allowed drop (%)", lambda r: _allowed(r["ips_allowed"], r["ips_rel"], 1, r["threshold_only"]), True),
        ("status", lambda r: r["status"], False),
        ("regression", lambda r: r["regression"] or "", False), ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    flagged = int((table["regression"] != "").sum())
    previous, single = _previous_note(data, table[~by_history], mixed=by_history.any())
    parts = [_history_note(table[by_history]), previous, f"{flagged} of {len(table)} configs regressed.", single]
    long = len(table) > 25  # the regressions are repeated at the top; fold the rest in the HTML
    section.add("table", fmt.table("", table, columns, " ".join(filter(None, parts)), details=long,
                                   css=lambda r: "bad" if r["regression"] else ""))
    if data.comparison_rules:  # per suite, how many configs each rule judged (as `bench report` prints them)
        section.add("note", "How the configs were judged: " + ". ".join(data.comparison_rules) + ".")
    return section


def _by_history(table: pd.DataFrame) -> pd.Series:
    """The rows whose history judged at least one metric (`history._rule`: "history", or "top1: history; ...")."""
    return table["rule"].astype(str).str.contains(history.HISTORY)


def _title(table: pd.DataFrame) -> str:
    """Which rule judged the rows: the previous run, each config's history of N earlier runs, or both."""
    by_history = _by_history(table) if not table.empty else pd.Series(dtype=bool)
    if not by_history.any():
        return "Comparison with the previous run"
    nights = table.loc[by_history, "nights"].astype(int)
    span = f"{nights.min()}" if nights.min() == nights.max() else f"{nights.min()}-{nights.max()}"
    title = f"Comparison with each config's history ({span} earlier runs)"
    return title if by_history.all() else f"{title} or the previous run"


def _against(data: ReportData) -> str:
    return ", ".join(f"{s}: run {r}" for s, r in data.baseline_runs.items())


def _judged_against(r: pd.Series) -> str:
    if r["rule"] == PREVIOUS:
        return f"run {r['run_before']}"
    if r["rule"] == history.HISTORY:
        return f"history: {r['run_before']}"
    return f"{r['rule']} ({r['run_before']})"  # one metric by its history, the other by the previous run


def _history_note(rows: pd.DataFrame) -> str:
    if rows.empty:
        return ""
    return (f"{len(rows)} config(s) judged against their own history (the runs under 'judged against'): 'before' is "
            f"the mean ± sd over those runs of each run's mean over seeds (the newest {history.WINDOW} at most; a run "
            f"more than {history.OUTLIER_K:g} robust sds from the median left out), images/s a geometric mean over the "
            "runs on the same GPU and library versions. "
            f"A drop is a regression when a one-sided t-test says tonight is below that history (Holm over every test "
            f"of the report, α {history.ALPHA}) and it is beyond {100 * history.TOP1_FLOOR:.1f} pts top1 or "
            f"{100 * history.SPEED_FLOOR:.0f}% images/s; 'allowed drop' is the drop that alone would be flagged.")


def _previous_note(data: ReportData, rows: pd.DataFrame, *, mixed: bool) -> tuple[str, str]:
    """The one-run rule in words, and the line on the configs it judged by the threshold alone (one seed)."""
    if rows.empty:
        return "", ""
    which = f"{len(rows)} config(s) compared with" if mixed else "Compared with"
    single = int(rows["threshold_only"].sum())
    rule = (f"{which} {_against(data)}, config by config: seeds folded into mean ± std, over the cells both runs "
            f"have. A drop counts as a regression only beyond both the threshold (top1 {100 * data.top1_drop:.2f} pts, "
            f"images/s {100 * data.speed_drop:.0f}%) and {stats.NOISE_K:g} standard errors of the difference of the "
            "means (the seeds' pooled spread; 'allowed drop' is the larger of the two); a seed that is no longer ok "
            "always counts.")
    alone = (f"{single} config(s) ran one seed on each side: nothing measures their noise, so the threshold alone "
             "applies to them (marked *)." if single else "")
    return rule, alone


def _allowed(value: object, delta: object, digits: int, threshold_only: bool) -> str:
    if pd.isna(delta):
        return fmt.DASH
    return f"{100 * float(value):.{digits}f}" + (" *" if threshold_only else "")
