"""`build_report`: results folder in, leaderboard.md (+ PNGs) and a self-contained leaderboard.html out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from bench.errors import ResultsError
from bench.report.compare import regression_lines
from bench.report.context import ReportData, make_context
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
    problems: list[str]  # skipped files (from the store) and warnings (mixed machines or versions)
    rows: int  # cells shown


def build_report(results: Path, out: Path, *, run: str | None = None, suite: str | None = None,
                 compare: str | None = None, regression_threshold: float = 0.01,
                 speed_regression_threshold: float = 0.10) -> ReportOutcome:
    """Build the report from the latest row per cell (or one run / suite) and compare with an earlier run.

    Unreadable files never stop it: they are listed in the report and in `problems`.
    """
    results, out = Path(results), Path(out)
    read = ResultStore(results).read()
    if read.cells.empty:
        skipped = f" ({len(read.problems)} unreadable files skipped)" if read.problems else ""
        raise ResultsError(f"no results in {results}{skipped}; run `bench run SUITE` first")
    selection = select_rows(read.cells, read.epochs, str(results), run=run, suite=suite, compare=compare)
    data = make_context(selection, top1_drop=regression_threshold, speed_drop=speed_regression_threshold)
    machine, warnings = provenance(data.current)
    regressions = regression_lines(data.comparison)
    sections = [make(data) for make in SECTIONS.values()]
    markdown, html, pngs = render(out, _header(data, results, machine), sections, regressions, warnings, read.problems)
    return ReportOutcome(markdown, html, pngs, regressions, read.problems + warnings, len(data.current))


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
    )
