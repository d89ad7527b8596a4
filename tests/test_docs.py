"""The README stays short and its pages under docs/ stay true: every cell field and every result column is
documented (the lists come from the schema, so they cannot drift), every link resolves, and every command shown in
a fenced block exists with the options it is given."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from bench.cli import main
from bench.result import CELL_SCHEMA, EPOCH_SCHEMA, config_columns
from bench.suite import Cell, RaceSpec, Suite

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
TEXTS = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *PAGES]}


def documented(page: str) -> set[str]:
    """Every `name` in backticks on a page."""
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", (ROOT / "docs" / page).read_text(encoding="utf-8")))


def test_the_readme_is_what_a_newcomer_needs():
    readme = TEXTS[ROOT / "README.md"]
    assert len(readme.splitlines()) < 150
    for heading in ("## Set-up on a fresh machine: two commands", "## A first suite of your own", "## Commands",
                    "## Read more"):
        assert heading in readme
    assert "docs/report-first-screen.png" in readme


def test_every_suite_field_is_documented():
    missing = (set(Cell.model_fields) | set(Suite.model_fields) | set(RaceSpec.model_fields)) - {"source"}
    assert sorted(missing - documented("suites.md")) == []


def test_every_result_column_is_documented():
    own = {f.name for f in CELL_SCHEMA} - set(config_columns()) | {f.name for f in EPOCH_SCHEMA}
    assert sorted(own - documented("results.md")) == []


def test_every_link_resolves():
    for page, text in TEXTS.items():
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def _commands() -> list[tuple[str, list[str]]]:
    """Every `bench ...` invocation in a fenced block of the README or a docs page: (page, words)."""
    found = []
    for page, text in TEXTS.items():
        for info, block in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text):
            if info not in ("bash", "sh", "console", ""):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, "#"
                words: list[str] = []
                for token in [*lexer, ";"]:
                    if token not in ("&&", "||", ";", "|", "(", ")", "&"):
                        words.append(token)
                        continue
                    while words and "=" in words[0] and not words[0].startswith("-"):
                        words = words[1:]  # VAR=value before the command
                    if words and words[0].endswith("bench") and not words[0].endswith("/bench/"):
                        found.append((page.name, words[1:]))
                    words = []
    return found


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    command, rest = main, list(words)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"bench has no command {name!r}"
        command = command.commands[name]
    return command, rest


def test_every_command_shown_exists_with_its_options():
    commands = _commands()
    assert ("README.md", ["run", "suites/smoke.yaml"]) in commands and ("README.md", ["report"]) in commands
    assert len(commands) >= 8
    for page, words in commands:
        command, rest = _resolve(words)
        options = {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        for word in rest:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in options, f"{page}: bench {' '.join(words)}: no option {word}"


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_page_leads_back_to_the_readme(page):
    assert "[Back to the README](../README.md)" in (ROOT / "docs" / page).read_text(encoding="utf-8")
