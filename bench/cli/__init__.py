"""The `bench` command: run, report, results, validate, models, race, predict, env, schema, fetch. Parsing and
printing only: `app` holds the group, each other module a family of commands (importing them registers them)."""

from bench.cli import checking, reading, running  # noqa: F401  (registers the commands on the group)
from bench.cli.app import SET_HELP, SMOKE, _load, friendly, main
from bench.cli.running import _default_devices, summary_table

__all__ = ["SET_HELP", "SMOKE", "_default_devices", "_load", "friendly", "main", "summary_table"]
