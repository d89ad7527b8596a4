"""Writing the report: `leaderboard.md` with PNGs beside it, and one self-contained `leaderboard.html`.

Both come from Jinja2 templates that walk the same sections. The HTML environment autoescapes, since
suite names, model names and error messages are text from outside; the Markdown one escapes table cells
and inline text itself (pipes would split a table row, `<` would start raw HTML).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from bench.atomic import atomic_text
from bench.report.fmt import Table
from bench.report.plots import OPTIONAL_PLOTS, PLOTS, PNG_DPI
from bench.report.sections import Section

_MD_SPECIAL = re.compile(r"([\\|<>`*\[\]])")


@dataclass(frozen=True)
class Header:
    title: str
    generated_at: str
    results: str
    runs: list[tuple[str, str, int]]  # suite, run id, cells it provides
    cells: int
    machine: dict[str, str]
    summary: str = ""  # the machine in a few words, for the first lines


def md(value: object) -> str:
    """Inline Markdown text: one line, with the characters that would change its meaning escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def md_table(table: Table) -> str:
    head = "| " + " | ".join(md(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---:" if n else "---" for n in table.numeric) + " |"
    body = ["| " + " | ".join(md(v) for v in row) + " |" for row in table.rows]
    return "\n".join([head, rule, *body])


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def display_width(png: bytes) -> int:
    """CSS pixels that show a 150-dpi PNG at its figure size, so text reads the same size in every plot."""
    return round(int.from_bytes(png[16:20], "big") * 96 / PNG_DPI)  # bytes 16-20: the IHDR width


def _environment(autoescape: bool) -> Environment:
    env = Environment(loader=PackageLoader("bench.report", "templates"), autoescape=autoescape,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(md=md, md_table=md_table, data_uri=data_uri, display_width=display_width)
    return env


def _write_text(path: Path, text: str) -> None:
    """Replace the file whole, so a reader never sees half a report."""
    atomic_text(path, text, sync=False)


def write_plots(out: Path, sections: list[Section]) -> list[Path]:
    """PNG files beside the Markdown; a plot skipped this time loses its stale PNG from an earlier report."""
    written = []
    drawn = {item.key: item for s in sections for kind, item in s.blocks if kind == "plot"}
    for key in [*PLOTS, *OPTIONAL_PLOTS]:
        path = out / f"{key}.png"
        plot = drawn.get(key)
        if plot is not None and plot.png is not None:
            path.write_bytes(plot.png)
            written.append(path)
        else:
            path.unlink(missing_ok=True)
    return written


def render(out: Path, header: Header, sections: list[Section], regressions: list[str], warnings: list[str],
           problems: list[str]) -> tuple[Path, Path, list[Path]]:
    """Write leaderboard.md, its PNGs and leaderboard.html into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(out, sections)
    context = dict(header=header, sections=sections, regressions=regressions, warnings=warnings, problems=problems)
    markdown, html = out / "leaderboard.md", out / "leaderboard.html"
    _write_text(markdown, _environment(autoescape=False).get_template("leaderboard.md.j2").render(**context))
    _write_text(html, _environment(autoescape=True).get_template("leaderboard.html.j2").render(**context))
    return markdown, html, pngs
