"""Each finished cell as an MLflow run (`bench run --mlflow URI`, the optional extra `bench[mlflow]`).

A copy for browsing, never the record: the runner calls the tracker only after the store has written the row,
and `Guard` turns the tracker's first failure into one warning and stops calling it, so a tracker can cost a run
nothing but its own copy.

    MLflow           from the row
    experiment       the suite's name
    run name         the model and the cell id; start and end times the cell's own
    params           the cell's fields, as the run resolved them (lr: null becomes the lr used)
    metrics          the row's other numbers (images_per_s, top1, peak_host_pss_bytes, ...)
    step metrics     the epoch table, as epoch/<column> with the epoch as the step
    tags             bench.suite, bench.run_id, bench.cell_id, bench.group_id, bench.status
    artifacts        cell.log (the cell's log) and cell.json (the whole cell, canonical)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from bench import status
from bench.errors import BenchError
from bench.result import config_columns

INSTALL = "pip install 'bench[mlflow]'"
MAX_PARAM_CHARS = 6000  # MLflow refuses longer parameter values
TAGS = ("suite", "run_id", "cell_id", "group_id", "status")
# how a cell ended, as an MLflow run status: a race's dropped cell is an answer, not a failure
RUN_STATUS = {status.OK: "FINISHED", status.DROPPED: "FINISHED", status.KILLED: "KILLED", status.TIMEOUT: "KILLED"}


class Tracker(Protocol):
    """Where finished cells are logged besides the results folder."""

    def start(self, suite: str) -> None:
        """Connect, before any cell runs (a bad address shows at once)."""

    def log_cell(self, row: dict[str, Any], epochs: list[dict[str, Any]], log_text: str | None) -> None:
        """Log one finished cell: its row, its epoch table and its log."""


class MlflowTracker:
    """One MLflow run per finished cell, in the experiment named after the suite."""

    def __init__(self, uri: str) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise BenchError(f"--mlflow needs MLflow, which is not installed; {INSTALL}, or drop --mlflow") from None
        self.uri = uri
        self._client_class = MlflowClient
        self._client: Any = None
        self._experiment_id: str | None = None

    def start(self, suite: str) -> None:
        self._client = self._client_class(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(suite)
        self._experiment_id = found.experiment_id if found else self._client.create_experiment(suite)

    def log_cell(self, row: dict[str, Any], epochs: list[dict[str, Any]], log_text: str | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, end_ms = self._client, _ms(row.get("finished_at")) or int(time.time() * 1000)
        run = client.create_run(self._experiment_id, start_time=_ms(row.get("started_at")) or end_ms,
                                run_name=f"{row.get('model')} {row.get('cell_id')}",
                                tags={f"bench.{key}": str(row.get(key)) for key in TAGS})
        run_id = run.info.run_id
        params = [Param(key, value) for key, value in params_of(row).items()]
        metrics = [Metric(key, value, end_ms, 0) for key, value in metrics_of(row).items()]
        metrics += [Metric(key, value, end_ms, step) for key, value, step in step_metrics_of(epochs)]
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("bench.error", row["error"][:5000])]
                         if row.get("error") else [])
        if log_text is not None:
            client.log_text(run_id, log_text, "cell.log")
        if row.get("cell_json"):
            client.log_text(run_id, row["cell_json"], "cell.json")
        client.set_terminated(run_id, RUN_STATUS.get(row.get("status"), "FAILED"), end_time=end_ms)


def params_of(row: dict[str, Any]) -> dict[str, str]:
    """The cell's fields from the row (resolved values where the run resolved them), as MLflow parameters:
    lists as JSON, empty fields left out, values cut to MLflow's limit."""
    out = {}
    for name in config_columns():
        value = row.get(name)
        if value is not None:
            out[name] = (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:MAX_PARAM_CHARS]
    return out


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers that are not cell fields: finite ints and floats (a flag is not a number here)."""
    config = config_columns()
    return {name: float(value) for name, value in row.items() if name not in config and _number(value)}


def step_metrics_of(epochs: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """The epoch table as (epoch/<column>, value, epoch): every finite number of every epoch row."""
    out = []
    for record in epochs:
        epoch = record.get("epoch")
        if epoch is None:
            continue
        out += [(f"epoch/{name}", float(value), int(epoch)) for name, value in record.items()
                if name != "epoch" and _number(value)]
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ms(moment: Any) -> int | None:
    return int(moment.timestamp() * 1000) if isinstance(moment, datetime) else None


class Guard:
    """A run's tracker, made harmless: its first failure (connecting or logging) is one warning event, and
    after it the run logs to it no more. No tracker: does nothing."""

    def __init__(self, tracker: Tracker | None, suite: str, report: Callable[[dict], None]) -> None:
        self.tracker, self.report = tracker, report
        self._call(lambda t: t.start(suite))

    def log_cell(self, row: dict[str, Any], epochs: list[dict[str, Any]], log_text: str | None) -> None:
        self._call(lambda t: t.log_cell(row, epochs, log_text))

    def _call(self, action: Callable[[Tracker], None]) -> None:
        if self.tracker is None:
            return
        try:
            action(self.tracker)
        except Exception as exc:  # noqa: BLE001 - any tracker failure: the rows are safe on disk, say it once
            where = getattr(self.tracker, "uri", type(self.tracker).__name__)
            why = " ".join(f"{exc.__class__.__name__}: {exc}".split())[:800]
            self.tracker = None
            self.report({"kind": "warning", "text": f"MLflow tracking at {where} failed, so this run logs no more "
                                                    f"cells there (every row is still in the results folder): {why}"})
