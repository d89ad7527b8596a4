"""The Ray executor on a local Ray instance: the same rows, statuses, logs and resume as the local runner."""

from __future__ import annotations

import json

import pytest

from bench.errors import BenchError
from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import expand, parse_suite

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install 'bench[ray]'`")

TINY = {"steps": 2, "batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False,
        "resolution": 32, "epochs": 1}


def tiny_suite(name: str, seeds: list[int]):
    return parse_suite({"name": name, "dataset": "synthetic", "defaults": {**TINY, "seeds": seeds},
                        "grid": {"model": ["tv:mobilenet_v3_small"]}})


def test_cells_run_as_ray_tasks_leave_the_same_rows_and_resume(tmp_path, monkeypatch):
    suite = tiny_suite("ray", [0, 1, 2])
    cells = expand(suite)
    # The injected failure travels as a BENCH_* variable, as the suite's settings do to a real cluster's nodes.
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[1].id: "raise"}))
    options = RunOptions(results=tmp_path, ray="local")
    summary = run_suite(suite, cells, options)
    status = {r["cell_id"]: r for r in summary.rows}
    assert [status[c.id]["status"] for c in cells] == ["ok", "error", "ok"]
    assert "injected failure" in status[cells[1].id]["error"]
    ok = status[cells[0].id]
    assert 0 <= ok["top1"] <= 1 and ok["peak_host_rss_bytes"] > 50 * 2**20 and ok["torch_version"]
    back = ResultStore(tmp_path).read()
    assert sorted(back.cells["cell_id"]) == sorted(c.id for c in cells) and not back.problems
    assert len(back.epochs[back.epochs["cell_id"] == cells[0].id]) == 1
    logs = list((tmp_path / "ray" / "logs").glob(f"{cells[1].id}--*.log"))
    assert logs and "injected failure" in logs[0].read_text()  # the node's log, written by the driver
    assert not ray.is_initialized()  # the instance bench started is shut down again

    again = run_suite(suite, cells, options)
    assert again.rows == [] and again.skipped == 3


def test_a_task_that_dies_becomes_a_killed_row(tmp_path, monkeypatch):
    from bench.executors import ray as ray_executor

    suite = tiny_suite("ray-dies", [0])
    cells = expand(suite)

    def die(*args):
        import os

        os._exit(1)  # the Ray worker process itself goes away, as when a node is lost

    monkeypatch.setattr(ray_executor, "run_on_node", die)
    summary = run_suite(suite, cells, RunOptions(results=tmp_path, ray="local"))
    assert [r["status"] for r in summary.rows] == ["killed"]
    assert "Ray task ended without a result" in summary.rows[0]["error"] and "died" in summary.rows[0]["error"]
    assert ResultStore(tmp_path).done_cell_ids("ray-dies") == {cells[0].id}


@pytest.mark.parametrize("address", ["bogus", "auto"])  # not an address; no cluster running here
def test_a_bad_address_is_one_clear_error_before_anything_is_written(tmp_path, address, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    suite = tiny_suite("bad", [0])
    with pytest.raises(BenchError, match=f"--ray {address}: cannot connect to a Ray cluster"):
        run_suite(suite, expand(suite), RunOptions(results=tmp_path / "r", ray=address))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("exc, expected", [
    (ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory."), "oom"),
    (ray.exceptions.TaskUnschedulableError("no node has the resources the task asks for"), "error"),
    (ray.exceptions.RuntimeEnvSetupError("pip install failed"), "error"),
    (ray.exceptions.NodeDiedError("node 10.0.0.3 died"), "killed"),
])
def test_a_task_ray_ended_becomes_its_cells_row_not_a_traceback(exc, expected):
    from bench.executors.ray import failed_task

    outcome = failed_task(ray, exc, "cuda:0")
    assert outcome.status == expected and outcome.error.startswith("the Ray task ended without a result")
    machine = outcome.parts["provenance"]
    assert machine.device == "cuda:0" and machine.hostname is None and outcome.log


def test_other_ray_errors_stop_the_run():
    from bench.executors.ray import failed_task

    with pytest.raises(ray.exceptions.GetTimeoutError):
        failed_task(ray, ray.exceptions.GetTimeoutError("timed out"), "cpu")
