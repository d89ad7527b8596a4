"""MLflow tracking (`bench run --mlflow URI`): each finished cell an MLflow run in a local store, read back with
MLflow's own client; a tracker that fails costs one warning and no row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import expand, parse_suite

TINY = {"steps": 4, "batch_size": 16, "train_subset": 32, "test_subset": 32, "pretrained": False,
        "resolution": 32, "epochs": 2, "infer_bench": "off"}


def tiny_suite(name: str, dataset: str, seeds: list[int]):
    return parse_suite({"name": name, "dataset": dataset, "defaults": {**TINY, "seeds": seeds},
                        "grid": {"model": ["tv:mobilenet_v3_small"]}})


@pytest.fixture(scope="module")
def quiet_mlflow():
    """MLflow offline and its artifacts under a temporary folder (a sqlite store keeps them in ./mlartifacts)."""
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'bench[mlflow]'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield patch


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, quiet_mlflow):
    """A tiny suite run with a sqlite store: one cell trains two epochs, one fails as it starts."""
    from bench.tracking import MlflowTracker

    work = tmp_path_factory.mktemp("mlflow")
    quiet_mlflow.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    suite = tiny_suite("tracked", "synthetic", [0, 1])
    cells = expand(suite)
    quiet_mlflow.setenv("BENCH_FAULTS", json.dumps({cells[1].id: "raise"}))
    events: list[dict] = []
    summary = run_suite(suite, cells, RunOptions(results=work / "results", tracker=MlflowTracker(uri)), events.append)
    return work, uri, summary, events


def mlflow_runs(uri: str, experiment: str) -> dict:
    """The experiment's MLflow runs by their bench.cell_id tag, and the client that read them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment named {experiment}"
    return {r.data.tags["bench.cell_id"]: r for r in client.search_runs([found.experiment_id])}, client


def test_each_finished_cell_is_one_mlflow_run_with_its_row(tracked):
    work, uri, summary, events = tracked
    assert not [e for e in events if e["kind"] == "warning"]
    runs, client = mlflow_runs(uri, "tracked")
    rows = {r["cell_id"]: r for r in summary.rows}
    assert sorted(runs) == sorted(rows) and len(rows) == 2
    for cell_id, row in rows.items():
        run = runs[cell_id]
        tags = run.data.tags
        assert {k: tags[f"bench.{k}"] for k in ("suite", "run_id", "cell_id", "group_id", "status")} == \
            {k: str(row[k]) for k in ("suite", "run_id", "cell_id", "group_id", "status")}
        # the cell's fields as parameters, resolved as the run used them; no identity column among them
        params = run.data.params
        assert params["model"] == "tv:mobilenet_v3_small" and params["seed"] == str(row["seed"])
        assert params["epochs"] == "2" and params["freeze"] == "none" and "cell_json" not in params
        assert run.info.run_name == f"tv:mobilenet_v3_small {cell_id}"
        # the cell's log, as the results folder keeps it (a healthy cell's may be empty)
        on_disk = ResultStore(work / "results").log_path("tracked", cell_id, row["run_id"]).read_text()
        assert Path(client.download_artifacts(run.info.run_id, "cell.log", str(work))).read_text() == on_disk
        assert row["status"] == "ok" or "injected failure" in on_disk
        cell_json = client.download_artifacts(run.info.run_id, "cell.json", str(work))
        assert json.loads(Path(cell_json).read_text()) == json.loads(row["cell_json"])


def test_a_trained_cell_logs_its_numbers_and_its_epochs(tracked):
    work, uri, summary, _ = tracked
    runs, client = mlflow_runs(uri, "tracked")
    row = next(r for r in summary.rows if r["status"] == "ok")
    run = runs[row["cell_id"]]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("top1", "val_top1_tested", "train_s", "wall_s", "peak_host_pss_bytes", "total_params"):
        assert metrics[name] == pytest.approx(row[name]), name
    assert row["lr"] is not None and float(run.data.params["lr"]) == pytest.approx(row["lr"])  # resolved, not null
    assert "lr" not in metrics and "channels_last" not in metrics  # config stays config; a flag is no number
    # the epoch table as step metrics, one point per epoch
    epochs = ResultStore(work / "results").latest_epochs("tracked", [row["cell_id"]])[row["cell_id"]]
    history = client.get_metric_history(run.info.run_id, "epoch/val_top1")
    assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e["val_top1"])) for e in epochs]
    assert len(history) == 2
    # the MLflow run spans the cell's own time
    assert run.info.end_time == int(row["finished_at"].timestamp() * 1000)


def test_a_failed_cell_is_a_failed_mlflow_run_that_says_why(tracked):
    _, uri, summary, _ = tracked
    runs, client = mlflow_runs(uri, "tracked")
    row = next(r for r in summary.rows if r["status"] != "ok")
    run = runs[row["cell_id"]]
    assert row["status"] == "error" and run.info.status == "FAILED"
    assert run.data.tags["bench.error"] == row["error"] and "injected failure" in row["error"]
    assert not client.get_metric_history(run.info.run_id, "epoch/val_top1")


def test_a_file_store_takes_the_same_rows(tracked, tmp_path):
    """The other local store: MLflow's file store (in maintenance mode since MLflow 3, so opted into)."""
    from bench.tracking import MlflowTracker

    work, _, summary, _ = tracked
    tracker = MlflowTracker((tmp_path / "mlruns").as_uri())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        tracker.start("tracked")
        store = ResultStore(work / "results")
        for row in summary.rows:
            epochs = store.latest_epochs("tracked", [row["cell_id"]]).get(row["cell_id"], [])
            tracker.log_cell(row, epochs, "the log")
        runs, client = mlflow_runs(tracker.uri, "tracked")
    ok = next(r for r in summary.rows if r["status"] == "ok")
    assert sorted(runs) == sorted(r["cell_id"] for r in summary.rows)
    assert runs[ok["cell_id"]].data.metrics["top1"] == pytest.approx(ok["top1"])
    assert len(client.get_metric_history(runs[ok["cell_id"]].info.run_id, "epoch/train_loss")) == 2


class Broken:
    """A tracker that fails (connecting, or logging a cell), counting its calls and whether each cell's row was
    already on disk when it was called."""

    def __init__(self, fail_at: str, results: Path):
        self.fail_at, self.results, self.calls, self.row_written = fail_at, results, [], []

    def start(self, suite):
        self.calls.append("start")
        if self.fail_at == "start":
            raise ConnectionError("tracking server refused the connection")

    def log_cell(self, row, epochs, log_text):
        self.calls.append(row["cell_id"])
        self.row_written.append(any(self.results.glob(f"*/cells/{row['cell_id']}--*.parquet")))
        raise RuntimeError("disk quota exceeded")


@pytest.mark.parametrize("fail_at", ["start", "log_cell"])
def test_a_failing_tracker_is_one_warning_and_every_row_is_kept(tmp_path, fail_at):
    # three cells without their dataset: rows without processes, so the test is quick
    suite = tiny_suite("broken", "cifar10", [0, 1, 2])
    tracker, events = Broken(fail_at, tmp_path), []
    options = RunOptions(results=tmp_path, data_root=tmp_path / "data", download=False, tracker=tracker)
    summary = run_suite(suite, expand(suite), options, events.append)
    warnings = [e["text"] for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1 and "every row is still in the results folder" in warnings[0]
    assert ("refused the connection" if fail_at == "start" else "disk quota exceeded") in warnings[0]
    assert len(tracker.calls) == (1 if fail_at == "start" else 2)  # given up after the first failure
    assert tracker.row_written == ([] if fail_at == "start" else [True])  # the tracker comes after the store
    assert len(summary.rows) == 3
    assert sorted(ResultStore(tmp_path).read().cells["cell_id"]) == sorted(r["cell_id"] for r in summary.rows)


def test_an_unusable_tracking_uri_is_one_warning(tmp_path, quiet_mlflow):
    from bench.tracking import MlflowTracker

    suite = tiny_suite("nowhere", "cifar10", [0])
    events: list[dict] = []
    options = RunOptions(results=tmp_path, data_root=tmp_path / "data", download=False,
                         tracker=MlflowTracker("nosuchscheme://tracking"))
    summary = run_suite(suite, expand(suite), options, events.append)
    warnings = [e["text"] for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1 and "nosuchscheme://tracking" in warnings[0] and "\n" not in warnings[0]
    assert len(summary.rows) == 1 and len(ResultStore(tmp_path).read().cells) == 1


@pytest.mark.parametrize("how", ["option", "env"])
def test_without_mlflow_installed_the_run_stops_before_any_cell_with_the_fix(tmp_path, monkeypatch, how):
    from bench.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    (tmp_path / "s.yaml").write_text("name: s\ndataset: synthetic\ndefaults: {epochs: 1}\ngrid: {model: [tv:resnet18]}\n")
    args = ["run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "results"), "--device", "cpu"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if how == "option":
        result = CliRunner().invoke(main, [*args, "--mlflow", uri])
    else:
        result = CliRunner().invoke(main, args, env={"BENCH_MLFLOW": uri})
    assert result.exit_code == 2, result.output
    assert "pip install 'bench[mlflow]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results").exists()
