"""Typed, user-facing errors. Each message names the problem and the fix in one sentence.

The CLI turns any `BenchError` into a one-line message and exit code 2; the runner turns the
`Unavailable` family into a result row with `status = unavailable`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """Base class of every error bench explains to its user instead of printing a traceback."""


class SuiteError(BenchError):
    """A suite file is malformed, or names a cell that cannot run."""


class UnknownModelError(BenchError):
    """A backbone name matches nothing in the registry."""


class UnknownDatasetError(BenchError):
    """A dataset name matches nothing in the registry."""


class ResolutionError(BenchError):
    """A model cannot take the requested input resolution."""


class UnavailableError(BenchError):
    """Something a cell needs (weights, a dataset) is not on disk and cannot be downloaded."""


class DatasetUnavailableError(UnavailableError):
    """A dataset is not on disk and could not be downloaded."""


class WeightsUnavailableError(UnavailableError):
    """Pretrained weights are not cached and could not be downloaded."""


class BadImageError(BenchError):
    """A file in an image folder cannot be decoded (truncated, or not an image despite its extension)."""


class ResultsError(BenchError):
    """The results folder cannot be used (locked by another run, unreadable, ...)."""


class ReportError(BenchError):
    """A report option is malformed (a budget such as --max-vram 8GiB, a margin, an export format)."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the closest choices, or '' when none is close."""
    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
