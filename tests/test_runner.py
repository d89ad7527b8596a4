"""The runner on real processes: every way a cell can end leaves the right row, the suite goes
on, a killed run resumes with each cell exactly once, and two runs never share a folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import measure
from bench.errors import ResultsError
from bench.runner import RunOptions, matches, run_suite
from bench.store import ResultStore
from bench.suite import Cell, expand, parse_suite

TINY = {"steps": 2, "batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False,
        "resolution": 32, "epochs": 1}


def tiny_suite(name: str, seeds: list[int], **extra):
    return parse_suite({"name": name, "dataset": "synthetic", "defaults": {**TINY, "seeds": seeds, **extra},
                        "grid": {"model": ["tv:mobilenet_v3_small"]}})


def test_each_failure_mode_leaves_its_status_and_the_suite_completes(tmp_path, monkeypatch):
    suite = tiny_suite("faults", [0, 1, 2, 3, 4])
    cells = expand(suite)
    faults = {cells[1].id: "raise", cells[2].id: "alloc:3500000000", cells[3].id: "sleep:300", cells[4].id: "sigkill"}
    monkeypatch.setenv("BENCH_FAULTS", json.dumps(faults))
    # cell 3 sleeps: give every cell a limit that the healthy ones meet with room to spare
    options = RunOptions(results=tmp_path, cell_timeout_s=60, max_host_bytes=2 * 2**30)
    summary = run_suite(suite, cells, options)
    status = {r["cell_id"]: r for r in summary.rows}
    assert [status[c.id]["status"] for c in cells] == ["ok", "error", "oom", "timeout", "killed"]
    assert "injected failure" in status[cells[1].id]["error"]
    assert status[cells[1].id]["peak_host_maxrss_bytes"] > 50 * 2**20  # a failed cell keeps what it measured
    # and says where it ran: the supervisor's provenance where the worker failed before taking its own
    assert all(status[c.id]["device"] == "cpu" and status[c.id]["torch_version"] for c in cells)
    assert "limit of 2.00 GiB" in status[cells[2].id]["error"]
    assert "time limit of 60 s" in status[cells[3].id]["error"]
    assert "SIGKILL" in status[cells[4].id]["error"]
    ok = status[cells[0].id]
    assert 0 <= ok["top1"] <= 1 and ok["train_s"] > 0 and ok["peak_host_rss_bytes"] > 50 * 2**20
    # every row is on disk, failed ones included, and reads back
    back = ResultStore(tmp_path).read()
    assert sorted(back.cells["cell_id"]) == sorted(c.id for c in cells) and not back.problems
    assert (tmp_path / "faults" / "logs").is_dir()


def test_a_completed_run_is_compacted_into_one_file_with_every_row(tmp_path):
    suite = tiny_suite("fold", [0, 1])
    cells = expand(suite)
    written = []
    real_write = ResultStore.write

    def spy(self, row, epochs):  # each cell is still written on its own first: a kill loses no finished cell
        written.append(real_write(self, row, epochs).name)
        return written[-1]

    import unittest.mock
    with unittest.mock.patch.object(ResultStore, "write", spy):
        summary = run_suite(suite, cells, RunOptions(results=tmp_path))
    assert sorted(written) == sorted(f"{c.id}--{summary.run_id}.parquet" for c in cells)
    for kind in ("cells", "epochs"):
        assert [p.name for p in (tmp_path / "fold" / kind).glob("*.parquet")] == [f"{summary.run_id}.run.parquet"]
    back = ResultStore(tmp_path).read()
    assert sorted(back.cells["cell_id"]) == sorted(c.id for c in cells) and len(back.epochs) == 2
    assert run_suite(suite, cells, RunOptions(results=tmp_path)).rows == []  # resume reads the compacted file


def test_second_run_skips_done_cells_and_rerun_keeps_old_rows(tmp_path):
    suite = tiny_suite("again", [0])
    cells = expand(suite)
    first = run_suite(suite, cells, RunOptions(results=tmp_path))
    second = run_suite(suite, cells, RunOptions(results=tmp_path))
    assert len(first.rows) == 1 and second.rows == [] and second.skipped == 1
    third = run_suite(suite, cells, RunOptions(results=tmp_path, rerun=True))
    assert len(third.rows) == 1
    rows = ResultStore(tmp_path).read().cells
    assert len(rows) == 2 and rows["run_id"].nunique() == 2  # nothing recorded is overwritten


def test_retry_failed_reruns_exactly_the_cells_whose_newest_row_failed(tmp_path, monkeypatch):
    suite = tiny_suite("retry", [0, 1, 2, 3])
    cells = expand(suite)
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[1].id: "raise", cells[2].id: "raise"}))
    first = run_suite(suite, cells[:3], RunOptions(results=tmp_path))  # cells[3] never runs
    assert [r["status"] for r in first.rows] == ["ok", "error", "error"]
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[2].id: "raise"}))  # cell 1 is fixed, cell 2 is not
    second = run_suite(suite, cells, RunOptions(results=tmp_path, retry_failed=True))
    assert {r["cell_id"]: r["status"] for r in second.rows} == {cells[1].id: "ok", cells[2].id: "error"}
    assert second.skipped == 2  # the ok cell and the one that never ran
    monkeypatch.delenv("BENCH_FAULTS")
    third = run_suite(suite, cells, RunOptions(results=tmp_path, retry_failed=True))
    assert [r["cell_id"] for r in third.rows] == [cells[2].id] and third.rows[0]["status"] == "ok"
    assert run_suite(suite, cells, RunOptions(results=tmp_path, retry_failed=True)).rows == []


def test_only_and_max_cells_narrow_a_run(tmp_path):
    suite = tiny_suite("narrow", [0, 1, 2])
    cells = expand(suite)
    assert matches(cells[0], "mobilenet*") and matches(cells[1], "seed=1") and not matches(cells[1], "seed=2")
    assert matches(cells[2], cells[2].id)
    summary = run_suite(suite, cells, RunOptions(results=tmp_path, only="seed=1"))
    assert [r["seed"] for r in summary.rows] == [1]
    summary = run_suite(suite, cells, RunOptions(results=tmp_path, max_cells=1))
    assert [r["seed"] for r in summary.rows] == [0]


def test_a_locked_results_folder_is_refused(tmp_path):
    suite = tiny_suite("locked", [0])
    with ResultStore(tmp_path).lock():
        with pytest.raises(ResultsError, match="another bench run"):
            run_suite(suite, expand(suite), RunOptions(results=tmp_path))


def _bench(*args, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_two_concurrent_runs_do_not_share_a_folder(tmp_path):
    (tmp_path / "s.yaml").write_text(json.dumps({"name": "both", "dataset": "synthetic", "defaults": {**TINY, "seeds": [0, 1]},
                                                 "grid": {"model": ["mobilenet_v3_small"]}}))
    first = _bench("run", "s.yaml", "--results", "res", cwd=tmp_path)
    deadline = time.time() + 60
    while not (tmp_path / "res" / ".lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    second = _bench("run", "s.yaml", "--results", "res", cwd=tmp_path)
    out2, _ = second.communicate(timeout=120)
    first.communicate(timeout=300)
    assert second.returncode == 2 and "another bench run" in out2
    rows = ResultStore(tmp_path / "res").read().cells
    assert sorted(rows["seed"]) == [0, 1]


@pytest.mark.parametrize("kill_after_s", [4.0, 9.0, 14.0])
def test_killed_run_resumes_with_each_cell_exactly_once(tmp_path, kill_after_s):
    (tmp_path / "s.yaml").write_text(json.dumps({"name": "resume", "dataset": "synthetic", "defaults": {**TINY, "seeds": [0, 1, 2]},
                                                 "grid": {"model": ["mobilenet_v3_small"]}}))
    victim = _bench("run", "s.yaml", "--results", "res", cwd=tmp_path)
    time.sleep(kill_after_s)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    finish = _bench("run", "s.yaml", "--results", "res", cwd=tmp_path)
    out, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, out
    rows = ResultStore(tmp_path / "res").read().cells
    assert sorted(rows["seed"]) == [0, 1, 2], out
    assert rows["cell_id"].is_unique and set(rows["status"]) == {"ok"}


def test_host_ram_probe_measures_a_known_allocation():
    size = 400 * 2**20
    code = ("import numpy as np, time, sys; time.sleep(0.6); print('go', flush=True); "
            f"a = np.ones({size}, dtype=np.uint8); time.sleep(0.8)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    process = psutil.Process(proc.pid)
    time.sleep(0.4)
    baseline = measure.tree_rss_bytes(process)
    with measure.PeakSampler(lambda: measure.tree_rss_bytes(process), interval_s=0.02) as sampler:
        proc.wait()
    grown = sampler.peak - baseline
    assert abs(grown - size) < 0.1 * size, (grown, size)


def test_tree_rss_includes_children():
    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import numpy as np, time; a = np.ones(300 * 2**20, dtype=np.uint8); time.sleep(3)']); time.sleep(3); p.wait()"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(2.0)
    total = measure.tree_rss_bytes(psutil.Process(proc.pid))
    own = psutil.Process(proc.pid).memory_info().rss
    proc.wait()
    assert total - own > 250 * 2**20


def test_missing_dataset_gives_unavailable_rows_that_a_later_run_retries(tmp_path):
    suite = parse_suite({"name": "nodata", "dataset": "cifar10", "defaults": {**TINY, "seeds": [0, 1]},
                         "grid": {"model": ["tv:mobilenet_v3_small"]}})
    options = RunOptions(results=tmp_path / "res", data_root=tmp_path / "data", download=False)
    first = run_suite(suite, expand(suite), options)
    assert [r["status"] for r in first.rows] == ["unavailable", "unavailable"]
    assert str(tmp_path / "data" / "cifar-10-batches-py") in first.rows[0]["error"]
    assert "bench fetch cifar10" in first.rows[0]["error"]
    # the rows are kept, but the cells are not done: once the data is there, the next run does them
    second = run_suite(suite, expand(suite), options)
    assert len(second.rows) == 2 and second.skipped == 0
    assert len(ResultStore(tmp_path / "res").read().cells) == 4


def test_several_devices_run_one_cell_each_at_once(tmp_path, monkeypatch):
    # `--gpus all` schedules one thread per device; two "cpu" devices exercise the same scheduler here.
    suite = tiny_suite("multi", [0, 1, 2])
    cells = expand(suite)
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({c.id: "sleep:6" for c in cells[:2]}))
    summary = run_suite(suite, cells, RunOptions(results=tmp_path, devices=("cpu", "cpu")))
    rows = {r["cell_id"]: r for r in summary.rows}
    assert sorted(rows) == sorted(c.id for c in cells) and {r["status"] for r in rows.values()} == {"ok"}
    first, second = rows[cells[0].id], rows[cells[1].id]
    assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]  # overlap
    assert sorted(ResultStore(tmp_path).read().cells["cell_id"]) == sorted(c.id for c in cells)


@pytest.mark.parametrize("visible, device, expected", [(None, "cuda:1", "1"), (None, "cuda", "0"), ("4,6", "cuda:1", "6")])
def test_each_gpu_worker_sees_only_its_gpu(monkeypatch, visible, device, expected):
    from bench.cellproc import child_env, worker_device

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert child_env(device)["CUDA_VISIBLE_DEVICES"] == expected
    assert worker_device(device) == "cuda:0" and worker_device("cpu") == "cpu"


class FakeNVML:
    """pynvml's calls that bench makes, over two physical GPUs with known used memory."""

    class NVMLError(Exception):
        pass

    used = {0: 1 << 30, 1: 3 << 30, "GPU-b": 5 << 30}
    lost = False

    def nvmlInit(self):
        pass

    def nvmlDeviceGetName(self, handle):
        return f"Fake GPU {handle}"

    def nvmlSystemGetDriverVersion(self):
        return b"999.1"

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.used:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.used:
            raise self.NVMLError("Not Found")
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.lost:
            raise self.NVMLError("GPU is lost")
        return type("Info", (), {"used": self.used[handle]})()


@pytest.mark.parametrize("visible, device, expected", [(None, "cuda:1", 3 << 30), ("1,0", "cuda:1", 1 << 30),
                                                       ("GPU-b", "cuda:0", 5 << 30), (None, "cuda:7", None),
                                                       (None, "cpu", None)])
def test_nvml_reads_the_physical_gpu_behind_the_cuda_index(monkeypatch, visible, device, expected):
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    reader = measure.nvml_used_reader(torch.device(device))
    assert (reader() if reader else None) == expected


def test_provenance_of_a_gpu_comes_from_nvml_without_touching_cuda(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = measure.environment(torch.device("cuda:1"))
    assert env["gpu_name"] == "Fake GPU 1" and env["driver_version"] == "999.1" and env["device"] == "cuda:1"
    assert not torch.cuda.is_initialized()


def test_a_lost_gpu_leaves_the_nvml_column_empty_instead_of_raising(monkeypatch):
    import torch

    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sampler = measure.PeakSampler(measure.nvml_used_reader(torch.device("cuda:0")))
    with sampler:
        fake.lost = True
    assert sampler.peak == 1 << 30  # read before the loss, and no NVMLError out of __exit__


@pytest.mark.parametrize("text, expected", [
    ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported at "
     "some other API call\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with "
     "`TORCH_USE_CUDA_DSA` to enable device-side assertions.\n", "CUDA error: an illegal memory access was encountered"),
    ("backend='inductor' raised:\nRuntimeError: boom\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace",
     "RuntimeError: boom"),
    ("first\nlast", "last"), ("", "RuntimeError")])
def test_error_text_is_the_last_line_that_says_what_happened(text, expected):
    from bench.status import message

    assert message(RuntimeError(text)) == expected


@pytest.mark.parametrize("exc, status", [(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "oom"),
                                         (MemoryError(), "oom"), (RuntimeError("CUDA out of memory. Tried"), "oom"),
                                         (RuntimeError("shape mismatch"), "error")])
def test_failures_are_classified(exc, status):
    from bench.status import classify

    assert classify(exc) == status


@pytest.mark.parametrize("pattern, expected", [
    ("pretrained=true", 2), ("pretrained=false", 0), ("model=resnet18", 1), ("model=tv:resnet18", 1),
    ("resolution=32", 2), ("freeze=all", 1), ("mobilenet*", 1),
])
def test_only_reads_values_as_yaml_and_model_names_as_suites_do(pattern, expected):
    from bench.errors import SuiteError
    from bench.runner import only_cells

    cells = [Cell(suite="s", model="tv:resnet18", resolution=32), Cell(suite="s", model="tv:mobilenet_v3_small",
                                                                        resolution=32, freeze="all")]
    if expected:
        assert len(only_cells(cells, pattern)) == expected
    else:
        with pytest.raises(SuiteError, match="matches none of the suite's 2 cells; their pretrained values are True"):
            only_cells(cells, pattern)


def test_only_with_an_unknown_field_or_no_match_is_one_clear_error(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    runner = CliRunner()
    for args, said in ((["--only", "modle=resnet18"], "no field 'modle' (did you mean: mode, model?)"),
                       (["--only", "resolution=999"], "their resolution values are")):
        result = runner.invoke(main, ["run", "--results", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert said in result.output and "Traceback" not in result.output
