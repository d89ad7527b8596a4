"""Human text for raw numbers (fractions -> %, bytes -> MiB/GiB, seconds -> s/min/h) and the `Table` both renderers share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

DASH = "–"


@dataclass(frozen=True)
class Table:
    """Text cells ready for Markdown or HTML; `numeric[i]` right-aligns column i."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    note: str = ""
    details: bool = False  # long tables are folded in the HTML
    css: list[str] = field(default_factory=list)  # one class per row ("bad" highlights a regression)

    def row_class(self, i: int) -> str:
        return self.css[i] if i < len(self.css) else ""


@dataclass
class Section:
    """One part of the report; both renderers walk its blocks in order."""

    key: str
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)  # ("table", Table) | ("plot", Plot) | ("note", str)

    def add(self, kind: str, item: object) -> Section:
        self.blocks.append((kind, item))
        return self


def _missing(value: object) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def text(value: object) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pct(value: object, std: object = None) -> str:
    """A fraction as a percentage with two decimals, with '± std' when there is a spread."""
    if _missing(value):
        return DASH
    out = f"{100 * float(value):.2f}"
    return out if _missing(std) else f"{out} ± {100 * float(std):.2f}"


def seconds(value: object) -> str:
    if _missing(value):
        return DASH
    s = float(value)
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def nbytes(value: object) -> str:
    if _missing(value):
        return DASH
    mib = float(value) / 2**20
    return f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.2f} GiB"


def count(value: object) -> str:
    """Parameter counts: 11.69 M, 5.1 k."""
    if _missing(value):
        return DASH
    v = float(value)
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    return f"{v / 1e3:.1f} k" if v >= 1e3 else f"{v:.0f}"


def rate(value: object) -> str:
    return DASH if _missing(value) else f"{float(value):,.0f}"


def ms(value: object) -> str:
    """Latencies: 0.42 ms, 3.1 ms, 120 ms."""
    if _missing(value):
        return DASH
    v = float(value)
    return f"{v:.2f} ms" if v < 1 else f"{v:.1f} ms" if v < 100 else f"{v:,.0f} ms"


def hours(value: object) -> str:
    """Device-hours: enough digits to tell a CPU smoke run's 0.0011 from zero."""
    if _missing(value):
        return DASH
    v = float(value)
    return f"{v:.2f}" if v >= 10 else f"{v:.3g}"


def gflops(value: object) -> str:
    return DASH if _missing(value) else f"{float(value) / 1e9:.2f}"


def delta_pts(value: object) -> str:
    return DASH if _missing(value) else f"{100 * float(value):+.2f}"


def delta_rel(value: object) -> str:
    return DASH if _missing(value) or math.isinf(float(value)) else f"{100 * float(value):+.1f}%"


def one_line(value: object, limit: int = 400) -> str:
    """Error messages in a table cell: one line, whitespace collapsed, long tracebacks cut (the log has them)."""
    if _missing(value):
        return DASH
    flat = " ".join(str(value).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


UNITS: dict[str, Callable[[object], str]] = {"pct": pct, "seconds": seconds, "bytes": nbytes, "rate": rate, "text": text,
                                             "ms": ms, "hours": hours}

# A column spec: header, how to get the text from a row, right-aligned?
Column = tuple[str, Callable[[pd.Series], str], bool]


def table(title: str, frame: pd.DataFrame, columns: list[Column], note: str = "", details: bool = False,
          css: Callable[[pd.Series], str] | None = None) -> Table:
    """Apply column specs to every row of `frame`."""
    rows = [[get(r) for _, get, _ in columns] for _, r in frame.iterrows()]
    classes = [css(r) for _, r in frame.iterrows()] if css else [""] * len(rows)
    return Table(title, [h for h, _, _ in columns], rows, [n for _, _, n in columns], note, details, classes)


def config_columns(config: list[str]) -> list[Column]:
    """Specs for the config fields: numbers right-aligned, everything else as text."""
    numeric = {"resolution", "batch_size", "epochs", "steps", "lr", "weight_decay", "head_hidden"}
    return [(c, (lambda r, c=c: text(r[c])), c in numeric) for c in config]
