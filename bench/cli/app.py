"""The `bench` group and what every command shares: the one-line error, loading a suite (the embedded smoke
suite by default)."""

from __future__ import annotations

import functools
import sys
from importlib import resources
from pathlib import Path

import click

from bench.errors import BenchError

SMOKE = "smoke"  # the embedded default suite, shipped inside the package


def _suite_path(suite: str | None) -> Path:
    if suite is None or suite == SMOKE:
        return Path(str(resources.files("bench") / "suites" / "smoke.yaml"))
    return Path(suite)


def friendly(fn):
    """Turn a BenchError into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bench")
def main() -> None:
    """Compare pretrained image backbones for transfer learning."""


def _load(suite: str | None, overrides: tuple[str, ...] = ()):
    from bench.suite import apply_overrides, load_suite
    from bench.validate import resolve_cells

    loaded = load_suite(_suite_path(suite))
    if overrides:
        loaded = apply_overrides(loaded, overrides)
    return loaded, resolve_cells(loaded)


SET_HELP = "KEY=VALUE for every cell, over the suite file (repeatable), e.g. --set epochs=1 --set batch_size=16."
