"""Several cells on one device (issue 23): `bench run --cells-per-gpu N|auto` and `--exclusive` in the local
executor. N cells side by side; auto as many as fit by expected VRAM from earlier rows; a throughput cell alone;
exclusive one cell on the whole machine; rows say concurrent_cells."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading

import pytest
from click.testing import CliRunner

from bench import cellproc
from bench import validate as est
from bench.cli import main
from bench.executors import local
from bench.executors.local import Packing, Slots
from bench.result import Process
from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import Cell, expand, parse_suite

GIB = 2**30
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
TINY = dict(model="tv:mobilenet_v3_small", dataset="synthetic", pretrained=False, resolution=32, batch_size=16,
            steps=2, epochs=1, train_subset=64, test_subset=32, infer_budget_s=0.2)
H100 = "NVIDIA H100 80GB HBM3"


def job(model: str = "tv:resnet18", **fields) -> cellproc.Job:
    return cellproc.Job(Cell(model=model, **fields))


# ---------------------------------------------------------------- the settings


@pytest.mark.parametrize("given, expected", [({}, Packing(1)), ({"BENCH_CELLS_PER_GPU": "3"}, Packing(3)),
                                             ({"BENCH_CELLS_PER_GPU": "auto"}, Packing("auto")),
                                             ({"BENCH_EXCLUSIVE": "1"}, Packing(1, True))])
def test_the_packing_comes_from_the_environment_the_cli_sets(monkeypatch, given, expected):
    for name in (local.CELLS_PER_GPU_ENV, local.EXCLUSIVE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert Packing.from_env() == expected


@pytest.mark.parametrize("argv, said", [(["--cells-per-gpu", "0"], "is not a number of cells"),
                                        (["--cells-per-gpu", "many"], "is not a number of cells"),
                                        (["--cells-per-gpu", "2", "--exclusive"], "pass one of them"),
                                        (["--cells-per-gpu", "2", "--ray", "local"], "a cluster")])
def test_bad_packing_is_one_error_line_before_any_cell_runs(tmp_path, argv, said):
    out = CliRunner().invoke(main, ["run", "--results", str(tmp_path), "--set", "steps=1", *argv])
    assert out.exit_code == 2 and said in out.output and "Traceback" not in out.output
    assert not list(tmp_path.rglob("*.parquet"))
    assert local.CELLS_PER_GPU_ENV not in os.environ and local.EXCLUSIVE_ENV not in os.environ


def test_the_cli_hands_the_packing_to_the_run_and_puts_the_environment_back(tmp_path, monkeypatch):
    seen = {}

    def fake_run_suite(suite, cells, options, report):
        seen.update(packing=Packing.from_env())
        from bench.runner import RunSummary
        return RunSummary("r")

    monkeypatch.setattr("bench.runner.run_suite", fake_run_suite)
    out = CliRunner().invoke(main, ["run", "--results", str(tmp_path), "--cells-per-gpu", "auto"])
    assert out.exit_code == 0, out.output
    assert seen["packing"] == Packing("auto") and local.CELLS_PER_GPU_ENV not in os.environ


# ---------------------------------------------------------------- which cell fits where


def test_n_per_device_and_a_throughput_cell_always_alone():
    slots = Slots([], ("cuda:0", "cuda:1"), Packing(2))
    a, b, c, fast = job(seed=0), job(seed=1), job(seed=2), job(mode="throughput")
    slots.running["cuda:0"] = [a]
    assert slots.fits(b, "cuda:0") and not slots.fits(fast, "cuda:0") and slots.fits(fast, "cuda:1")
    slots.running["cuda:0"] = [a, b]
    assert not slots.fits(c, "cuda:0")
    slots.running["cuda:0"], slots.running["cuda:1"] = [], [fast]
    assert slots.fits(c, "cuda:0") and not slots.fits(c, "cuda:1")


def test_exclusive_runs_one_cell_on_the_whole_machine():
    slots = Slots([], ("cuda:0", "cuda:1"), Packing(1, exclusive=True))
    assert slots.fits(job(), "cuda:1")
    slots.running["cuda:0"] = [job(seed=5)]
    assert not slots.fits(job(), "cuda:1")


def test_auto_packs_by_expected_vram_and_runs_the_unknown_alone():
    small, small2, big, unknown = job(seed=0), job(seed=1), job(resolution=224), job("tv:vgg16")
    expected = {small.cell.id: 30 * GIB, small2.cell.id: 30 * GIB, big.cell.id: 60 * GIB, unknown.cell.id: None}
    slots = Slots([], ("cuda:0",), Packing("auto"), expected, {"cuda:0": 80 * GIB})
    assert slots.fits(small, "cuda:0") and slots.fits(unknown, "cuda:0")  # an empty device takes anything
    slots.running["cuda:0"] = [small]
    assert slots.fits(small2, "cuda:0") and not slots.fits(big, "cuda:0") and not slots.fits(unknown, "cuda:0")
    cpu = Slots([], ("cpu",), Packing("auto"), expected, {"cpu": None})
    cpu.running["cpu"] = [small]
    assert not cpu.fits(small2, "cpu")  # no device memory known (the CPU): one at a time


def _row(store: ResultStore, cell: Cell, **values) -> None:
    store.write({**cell.model_dump(), "freeze": str(cell.freeze), "run_id": "r1", "cell_id": cell.id,
                 "group_id": cell.group_id, "status": "ok", "device": "cuda:0", "gpu_name": H100, "wall_s": 10.0,
                 "started_at": T0, "finished_at": T0, "total_params": 11_000_000, "data_device_bytes": 0, **values}, [])


def test_auto_expects_the_vram_earlier_rows_of_the_model_needed(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    seen = Cell(suite="s", model="tv:resnet18", batch_size=128)
    _row(store, seen, peak_vram_process_bytes=4 * GIB)
    bigger, other = Cell(suite="s", model="tv:resnet18", batch_size=256), Cell(suite="s", model="tv:resnet50")
    target = est.Target("h100", H100, H100, 80 * GIB)
    expected = est.expected_memory([seen, bigger, other], results=tmp_path, target=target)
    fixed = 16 * 11_000_000  # weights, gradients and optimizer state do not grow with the batch
    assert expected[seen.id] == pytest.approx(4 * GIB)
    assert expected[bigger.id] == pytest.approx(fixed + 2 * (4 * GIB - fixed))
    assert expected[other.id] is None
    monkeypatch.setattr(local, "_gpu_memory", lambda device: (H100, 80 * GIB))
    jobs = [cellproc.Job(c, state_dir=str(store.state_dir("s", c.id))) for c in (seen, bigger, other)]
    guessed, capacity = local._expected_memory(jobs, ("cuda:0",), Packing("auto"))
    assert guessed == expected and capacity == {"cuda:0": 80 * GIB}


# ---------------------------------------------------------------- on real processes


def test_two_cells_per_cpu_run_side_by_side_with_the_results_they_get_alone(tmp_path, monkeypatch):
    defaults = {k: v for k, v in TINY.items() if k not in ("dataset", "model")}
    suite = parse_suite({"name": "packed", "dataset": "synthetic", "defaults": defaults,
                         "grid": {"model": [TINY["model"]], "seed": [0, 1]}})
    cells = expand(suite)
    with local.packed(None, True):
        alone = run_suite(suite, cells, RunOptions(results=tmp_path / "alone")).rows
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({c.id: "sleep:3" for c in cells}))  # they overlap for sure
    with local.packed("2", False):
        packed = run_suite(suite, cells, RunOptions(results=tmp_path / "packed")).rows
    assert [r["concurrent_cells"] for r in alone] == [1, 1] and [r["concurrent_cells"] for r in packed] == [2, 2]
    by_id = {r["cell_id"]: r for r in alone}
    for row in packed:
        assert row["status"] == "ok" and row["top1"] is not None
        before = by_id[row["cell_id"]]
        assert (row["top1"], row["train_loss_final"]) == (before["top1"], before["train_loss_final"])  # CPU: exact


def test_a_throughput_cell_waits_for_its_device_to_empty(monkeypatch):
    both = threading.Barrier(2, timeout=0.5)

    def fake_run_cell(job, device, server, report, stop):
        try:
            both.wait()
        except threading.BrokenBarrierError:
            pass
        return cellproc.Outcome("ok", parts={"process": Process(wall_s=1.0)})

    monkeypatch.setattr(local.cellproc, "run_cell", fake_run_cell)
    jobs = [job(seed=0), job(seed=1, mode="throughput"), job(seed=2)]
    outcomes = {c.id: o for c, o in local.LocalExecutor(("cpu",), Packing(3)).run(jobs, lambda ev: None)}
    shared = {j.cell.mode + str(j.cell.seed): outcomes[j.cell.id].parts["process"].concurrent_cells for j in jobs}
    assert shared["throughput1"] == 1 and shared["train0"] == shared["train2"] == 2
