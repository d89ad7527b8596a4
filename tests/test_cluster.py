"""The Ray executor on a local Ray instance: the same rows, statuses, logs and resume as the local runner."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench.cellproc import Job, Outcome
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


def test_a_task_that_dies_becomes_a_killed_row_and_a_lost_result_no_row(tmp_path, monkeypatch, capsys):
    from bench.executors import ray as ray_executor

    suite = tiny_suite("ray-dies", [0, 1])
    cells = expand(suite)

    def die(*args):
        import os

        os._exit(1)  # the Ray worker process itself goes away, as when a node is lost

    # The first task's result lost after the task ended (its node gone): Ray's error, raised where Ray raises it.
    # A real one needs a second node whose death loses an object too big to travel inline: not a fast test.
    real_get, asked = ray.get, []

    def get(ref, *args, **kwargs):
        asked.append(ref)
        if len(asked) == 1:
            raise ray.exceptions.ObjectLostError(ref.hex(), None, "")
        return real_get(ref, *args, **kwargs)

    monkeypatch.setattr(ray_executor, "run_on_node", die)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray_executor, "check_nodes", lambda ray: None)  # its probe's get is not a cell's
    summary = run_suite(suite, cells, RunOptions(results=tmp_path, ray="local"))
    assert [r["status"] for r in summary.rows] == ["killed"]
    assert "Ray task ended without a result" in summary.rows[0]["error"] and "died" in summary.rows[0]["error"]
    store = ResultStore(tmp_path)
    assert store.done_cell_ids("ray-dies") == {summary.rows[0]["cell_id"]}  # the other runs again next time
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(said) == 1 and "Ray lost the outcome of cell" in said[0] and "ObjectLostError" in said[0], said


@pytest.mark.parametrize("address", ["bogus", "auto"])  # not an address; no cluster running here
def test_a_bad_address_is_one_clear_error_before_anything_is_written(tmp_path, address, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    suite = tiny_suite("bad", [0])
    with pytest.raises(BenchError, match=f"--ray {address}: cannot connect to a Ray cluster"):
        run_suite(suite, expand(suite), RunOptions(results=tmp_path / "r", ray=address))
    assert not (tmp_path / "r").exists()


def test_a_cluster_asking_for_a_token_gets_the_hint_and_others_the_usual_one():
    from bench.executors.ray import _connect_hint

    try:
        try:
            raise ray.exceptions.AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing")
        except ray.exceptions.AuthenticationError as inner:
            raise RuntimeError("Failed to connect to GCS") from inner
    except RuntimeError as middle:
        chained = ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6399")
        chained.__cause__ = middle
    assert "set RAY_AUTH_MODE=token" in _connect_hint(chained)
    assert _connect_hint(ConnectionError("no GCS")).startswith("start one with `ray start --head`")


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


@pytest.mark.parametrize("exc", [
    ray.exceptions.ObjectLostError("ab12", None, ""),
    ray.exceptions.ObjectFetchTimedOutError("ab12", None, ""),
    ray.exceptions.ObjectReconstructionFailedError("ab12", None, ""),
])
def test_a_result_ray_lost_after_its_task_ran_is_no_row(exc):
    from bench.executors.ray import failed_task

    assert failed_task(ray, exc, "cpu") is None  # the harness failed, not the cell: it runs again next time


@pytest.mark.parametrize("exc", [
    ray.exceptions.GetTimeoutError("timed out"),
    ray.exceptions.RaySystemError("the raylet is gone", "Traceback (most recent call last):\n  ..."),
    ray.exceptions.LocalRayletDiedError(),
    ray.exceptions.ObjectStoreFullError("the object store is full\nmore"),
])
def test_other_ray_errors_stop_the_run_with_one_line(exc):
    from bench.executors.ray import failed_task

    with pytest.raises(BenchError, match=f"^Ray failed, not a cell \\({type(exc).__name__}: ") as raised:
        failed_task(ray, exc, "cpu")
    assert "\n" not in str(raised.value) and raised.value.__cause__ is None


class FakeRay:
    """What the Ray executor asks of Ray, with Ray's own exceptions: each task's result (an outcome, or the error
    `ray.get` raises), and a `ray.wait` that fails from its `broken`-th call on."""

    exceptions = ray.exceptions

    def __init__(self, results: dict, broken: int | None = None):
        self.results, self.broken, self.waits, self.cancelled = results, broken, 0, []

    def cluster_resources(self):
        return {"CPU": 2}

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 2}}]

    def remote(self, **resources):
        return lambda fn: SimpleNamespace(remote=lambda job, device: job.cell.id)  # the cell's id is its task

    def wait(self, refs, num_returns):
        self.waits += 1
        if self.broken is not None and self.waits >= self.broken:
            raise ray.exceptions.RaySystemError("the raylet died")
        return refs[:1], refs[1:]

    def get(self, ref):
        if isinstance(self.results[ref], BaseException):
            raise self.results[ref]
        return self.results[ref]

    def cancel(self, ref, force):
        self.cancelled.append(ref)
        raise ray.exceptions.RaySystemError("nothing to cancel on a cluster that is gone")


def test_ray_failing_under_the_driver_is_one_line_and_lost_results_are_no_rows(monkeypatch, capsys):
    from bench.executors import ray as ray_executor

    cells = expand(tiny_suite("fake", [0, 1, 2, 3]))
    jobs = [Job(cell) for cell in cells]
    ok = Outcome("ok")
    lost = ray.exceptions.ObjectLostError("ab12", None, "")
    fake = FakeRay({cells[0].id: lost, cells[1].id: ok, cells[2].id: ok, cells[3].id: ok}, broken=3)
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
    monkeypatch.setattr(ray_executor, "check_nodes", lambda ray: None)  # tests/test_ray_cluster.py: real nodes
    outcomes = ray_executor.RayExecutor("fake").run(jobs, lambda event: None)
    assert next(outcomes) == (cells[1], ok)  # the first cell's result was lost: no row, the run goes on
    with pytest.raises(BenchError, match=r"^Ray failed, not a cell \(RaySystemError: System error: the raylet died"):
        next(outcomes)
    assert fake.cancelled == [cells[2].id, cells[3].id]  # each tried, though the first cancel failed
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(said) == 1 and said[0].startswith(f"warning: Ray lost the outcome of cell {cells[0].id}"), said
