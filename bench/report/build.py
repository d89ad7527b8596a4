"""`build_report`: results folder in, leaderboard.md (+ PNGs) and a self-contained leaderboard.html out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.errors import ResultsError
from bench.report.compare import regression_lines
from bench.report.context import ReportData, make_context
from bench.report.fmt import Section
from bench.report.history import history_rows
from bench.report.recommend import Budget
from bench.report.render import Header, render
from bench.report.sections import SECTIONS
from bench.report.select import provenance, select_rows
from bench.store import ResultStore


@dataclass
class ReportOutcome:
    markdown: Path
    html: Path
    pngs: list[Path]
    regressions: list[str]  # one human line per flagged regression
    problems: list[str]  # skipped files (from the store), warnings (mixed machines or versions), failed plots
    rows: int  # cells shown
    comparison: list[str] = field(default_factory=list)  # per suite: configs compared, and by which rule


@dataclass(frozen=True)
class Loaded:
    data: ReportData
    problems: list[str]  # unreadable files the store skipped
    cells: pd.DataFrame  # every row the store read, all runs


def load(results: Path, *, run: str | None = None, suite: str | None = None, compare: str | None = None,
         regression_threshold: float = 0.01, speed_regression_threshold: float = 0.10,
         budget: Budget | None = None) -> Loaded:
    """Everything a report is built from: the latest row per cell (or one run / suite), folded and chosen."""
    # One suite's folder only, when it exists: a long history of other suites costs nothing. A misspelled suite
    # reads everything, so that select_rows can name the suites there are.
    only = [suite] if suite and (Path(results) / suite).is_dir() else None
    read = ResultStore(results).read(suites=only)
    if read.cells.empty:
        skipped = f" ({len(read.problems)} unreadable files skipped)" if read.problems else ""
        raise ResultsError(f"no results in {results}{skipped}; run `bench run SUITE` first")
    selection = select_rows(read.cells, read.epochs, str(results), run=run, suite=suite, compare=compare)
    # Without --compare, the suites' earlier runs: judged against their history when there are enough of them.
    history = None if compare else history_rows(read.cells, selection.current)
    data = make_context(selection, top1_drop=regression_threshold, speed_drop=speed_regression_threshold,
                        budget=budget, history=history)
    return Loaded(data, read.problems, read.cells)


def build_report(results: Path, out: Path, *, run: str | None = None, suite: str | None = None,
                 compare: str | None = None, regression_threshold: float = 0.01,
                 speed_regression_threshold: float = 0.10, budget: Budget | None = None) -> ReportOutcome:
    """Build the report from the latest row per cell (or one run / suite) and compare with an earlier run.

    Unreadable files never stop it: they are listed in the report and in `problems`. Nor does a plot or a section
    that raises: it becomes one line in the report and in `problems`, and the rest is written.
    """
    results, out = Path(results), Path(out)
    loaded = load(results, run=run, suite=suite, compare=compare, regression_threshold=regression_threshold,
                  speed_regression_threshold=speed_regression_threshold, budget=budget)
    data = loaded.data
    machine, warnings = provenance(data.current)
    warnings = warnings + data.comparison_notes  # images/s not compared across GPUs or library versions
    regressions = regression_lines(data.comparison)
    sections = [s for key, make in SECTIONS.items() if (s := _section(key, make, data)) is not None]
    failures = [item.note for s in sections for kind, item in s.blocks if kind == "plot" and item.failed]
    failures += [item for s in sections for kind, item in s.blocks if kind == "failure"]
    markdown, html, pngs = render(out, _header(data, results, machine), sections, regressions, warnings, loaded.problems)
    return ReportOutcome(markdown, html, pngs, regressions, loaded.problems + warnings + failures, len(data.current),
                         data.comparison_rules)


def _section(key: str, make, data: ReportData) -> Section | None:
    try:
        return make(data)
    except Exception as exc:  # one section must not take the report down: the line names the error, problems list it
        message = " ".join(str(exc).split())[:300]
        return Section(key, key).add("failure", f"section {key} skipped: {type(exc).__name__}: {message}")


def _header(data: ReportData, results: Path, machine: dict[str, str]) -> Header:
    suites = sorted(data.current["suite"].astype(str).unique())
    runs = data.current.groupby(["suite", "run_id"]).size().reset_index(name="n").sort_values(["suite", "run_id"])
    return Header(
        title=f"bench leaderboard: {', '.join(suites)}",
        generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        results=str(results),
        runs=[(str(s), str(r), int(n)) for s, r, n in runs.itertuples(index=False)],
        cells=len(data.current),
        machine=machine,
        summary=_summary(data),
    )


def _summary(data: ReportData) -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.4.0', or 'CPU (Intel ...)': where the numbers come from, in a few words."""
    current = data.current
    gpus = sorted(current["gpu_name"].dropna().astype(str).unique())
    cpus = sorted(current["cpu_model"].dropna().astype(str).unique()) if "cpu_model" in current else []
    where = ", ".join(gpus) if gpus else "CPU" + (f" ({', '.join(cpus)})" if cpus else "")
    torch = sorted(current["torch_version"].dropna().astype(str).unique())
    return where + (f", torch {', '.join(torch)}" if torch else "")
