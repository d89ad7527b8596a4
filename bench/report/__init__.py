"""The report stage: tables, plots (seaborn) and rendering of Markdown and self-contained HTML.

It never opens a results file itself: `bench.store.ResultStore.read()` hands it DataFrames.
"""

from bench.report.build import ReportOutcome, build_report

__all__ = ["ReportOutcome", "build_report"]
