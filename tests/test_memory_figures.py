"""Memory and time as a user would meet them: inference measured without training's leftovers, the VRAM the cell's
process held (NVML, per process) budgeted by --max-vram, host RAM as PSS everywhere, throughput timed from the first
step, and every row saying how many cells shared its host."""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import sys
import threading
import time
import weakref

import pandas as pd
import pytest
import torch

import bench.train
from bench import cellproc, measure
from bench import validate as est
from bench.executors import local
from bench.executors.local import Concurrency, LocalExecutor
from bench.report import plots as report_plots
from bench.report.build import build_report, load
from bench.report.recommend import Budget
from bench.result import Process
from bench.store import ResultStore
from bench.suite import Cell, expand, parse_suite
from benchmarks.gpu_check import steps_measure

GIB, MIB = 2**30, 2**20
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
TINY = dict(model="tv:mobilenet_v3_small", dataset="synthetic", pretrained=False, resolution=32, batch_size=16,
            steps=2, epochs=1, train_subset=64, test_subset=32, infer_budget_s=0.2)


def _work(cell: Cell) -> dict:
    from bench import worker

    return worker.work(cell, {"device": "cpu", "data_root": None, "download": False})[0]


# ---------------------------------------------------------------- inference without training's leftovers


def test_inference_starts_from_the_weights_alone(monkeypatch):
    optimizers, params, seen = [], [], []

    class Recorded(bench.train.Stepper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(weakref.ref(self.opt))
            params.extend(p for p in self.module.parameters() if p.requires_grad)

    reset = measure.reset_vram

    def watched(device):  # the inference peak starts here: what is still held counts in it
        seen.append({"optimizers_alive": sum(o() is not None for o in optimizers),
                     "grads": sum(p.grad is not None for p in params)})
        reset(device)

    monkeypatch.setattr(bench.train.graphs, "Stepper", Recorded)  # what run_cell builds (make_stepper)
    monkeypatch.setattr(measure, "reset_vram", watched)
    gc.disable()  # the scheduler-optimizer cycle must be freed on purpose, not by a collection that happens to run
    try:
        parts = _work(Cell(**TINY))
    finally:
        gc.enable()
    assert parts["inference"].infer_images_per_s > 0 and len(optimizers) == 1
    assert len(seen) == 2  # the cell's start, then inference's
    assert seen[-1] == {"optimizers_alive": 0, "grads": 0}


def test_release_training_drops_the_gradients_and_frees_the_optimizer():
    from bench.train.infer import release_training

    gc.disable()
    try:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
        # A reference cycle keeps the optimizer (and its momentum) past its last name: torch's LR schedulers make
        # one with their optimizer in some versions and import orders; here it is made sure.
        opt.scheduler = sched
        alive = weakref.ref(opt)
        del opt, sched
        assert alive() is not None
        release_training(model)
        assert alive() is None and all(p.grad is None for p in model.parameters())
    finally:
        gc.enable()


# ---------------------------------------------------------------- VRAM of the cell's process (NVML)


class FakeNVML:
    class NVMLError(Exception):
        pass

    def __init__(self, processes):
        self.processes, self.lost = processes, False

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.lost:
            raise self.NVMLError("GPU is lost")
        return [type("Process", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in self.processes]


def test_the_process_reader_reads_this_process_alone(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNVML([(1, 9 * GIB), (os.getpid(), 3 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    read = measure.nvml_process_reader(torch.device("cuda:0"))
    assert read() == 3 * GIB
    fake.processes = [(1, 9 * GIB)]  # not listed (no CUDA call yet, or another PID namespace): no figure
    assert read() is None
    fake.processes, fake.lost = [(os.getpid(), None)], False  # NVML cannot say (MIG, WDDM)
    assert read() is None
    fake.lost = True
    assert read() is None
    assert measure.nvml_process_reader(torch.device("cpu")) is None


def test_the_worker_records_the_process_peak_beside_the_device_peak(monkeypatch):
    values = iter([1 * GIB, 2 * GIB])
    monkeypatch.setattr(measure, "nvml_process_reader", lambda device: lambda: next(values, 0))
    monkeypatch.setattr(measure, "nvml_used_reader", lambda device: lambda: 5 * GIB)
    peaks = _work(Cell(**TINY))["peaks"]
    assert peaks.peak_vram_process_bytes == 2 * GIB and peaks.peak_vram_nvml_bytes == 5 * GIB


# ---------------------------------------------------------------- throughput timed from the first step


def test_throughput_without_warmup_does_not_time_the_optimizers_construction(monkeypatch):
    class Slow(bench.train.Stepper):
        def __init__(self, *args, **kwargs):
            time.sleep(5.0)  # an optimizer that takes long to build is setup, not training
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bench.train.graphs, "Stepper", Slow)  # what run_cell builds (make_stepper)
    cell = Cell(**{**TINY, "mode": "throughput", "throughput_warmup_steps": 0, "throughput_steps": 3})
    parts = _work(cell)
    training = parts["training"]
    assert training.steps_run == 3 and training.warmup_s == 0.0
    assert training.train_s < 5.0 and training.images_per_s > 3 * 16 / 5.0
    assert parts["peaks"].setup_s >= 5.0  # counted up to the first step


# ---------------------------------------------------------------- concurrent_cells


def test_concurrency_is_the_most_cells_at_once_during_each_cells_life():
    together = Concurrency()
    with together.cell() as first:
        with together.cell() as second:
            pass
        with together.cell() as third:
            with together.cell() as fourth:
                pass
    with together.cell() as alone:
        pass
    assert (first.most, second.most, third.most, fourth.most, alone.most) == (3, 2, 3, 3, 1)


@pytest.mark.parametrize("devices, expected", [(("cpu", "cpu"), [2, 2]), (("cpu",), [1, 1])])
def test_the_local_executor_writes_concurrent_cells_into_the_process_part(monkeypatch, devices, expected):
    both = threading.Barrier(2, timeout=0.5)

    def fake_run_cell(job, device, server, report, stop):
        try:
            both.wait()  # with two devices the two cells overlap for sure; with one, the wait times out
        except threading.BrokenBarrierError:
            pass
        return cellproc.Outcome("ok", parts={"process": Process(wall_s=1.5, start_method="forkserver")})

    monkeypatch.setattr(local.cellproc, "run_cell", fake_run_cell)
    jobs = [cellproc.Job(Cell(**TINY, seed=s)) for s in (0, 1)]
    outcomes = [o for _, o in LocalExecutor(devices).run(jobs, lambda ev: None)]
    assert sorted(o.parts["process"].concurrent_cells for o in outcomes) == expected
    assert all(o.parts["process"].wall_s == 1.5 and o.parts["process"].start_method == "forkserver" for o in outcomes)


def test_two_cells_on_two_cpu_devices_say_they_shared_the_host(tmp_path, monkeypatch):
    from bench.runner import RunOptions, run_suite

    defaults = {k: v for k, v in TINY.items() if k not in ("dataset", "model")}
    suite = parse_suite({"name": "shared", "dataset": "synthetic", "defaults": defaults,
                         "grid": {"model": [TINY["model"]], "seed": [0, 1]}})
    cells = expand(suite)
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({c.id: "sleep:3" for c in cells}))  # both run at once
    rows = run_suite(suite, cells, RunOptions(results=tmp_path, devices=("cpu", "cpu"))).rows
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["concurrent_cells"] for r in rows] == [2, 2]
    stored = ResultStore(tmp_path).read().cells
    assert list(stored["concurrent_cells"]) == [2, 2]


# ---------------------------------------------------------------- the report


def _write(store: ResultStore, model: str, seed: int = 0, **values) -> Cell:
    cell = Cell(suite="mem", model=model, seed=seed, resolution=224)
    store.write({**cell.model_dump(), "freeze": str(cell.freeze), "run_id": "r1", "cell_id": cell.id,
                 "group_id": cell.group_id, "status": "ok", "top1": 0.8, "val_top1_best": 0.8, "train_s": 100.0,
                 "images_per_s": 500.0, "device": "cuda:0", "gpu_name": "NVIDIA H100 80GB HBM3",
                 "started_at": T0, "finished_at": T0, **values}, [])
    return cell


def _table(markdown: str, heading: str) -> list[dict]:
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def test_the_report_shows_pss_marks_rss_and_marks_the_times_of_cells_that_shared(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results")
    _write(store, "resnet18", peak_host_pss_bytes=2 * GIB, peak_host_rss_bytes=5 * GIB, concurrent_cells=1,
           val_top1_best=0.9)
    _write(store, "resnet50", peak_host_rss_bytes=3 * GIB, concurrent_cells=2)  # older row: RSS only
    monkeypatch.setattr(report_plots, "PLOTS", {})
    markdown = build_report(tmp_path / "results", tmp_path / "out").markdown.read_text()
    board = {r["model"]: r for r in _table(markdown, "## Leaderboard")}
    assert board["resnet18"]["peak host RAM"] == "2.00 GiB"  # PSS, not the 5 GiB RSS
    assert board["resnet50"]["peak host RAM"] == "3.00 GiB (RSS)"
    assert "†" not in board["resnet18"]["train time"] and "†" not in board["resnet18"]["images/s"]
    assert board["resnet50"]["train time"].endswith(" †") and board["resnet50"]["images/s"].endswith(" †")
    assert "† 1 row(s) ran beside other cells on the same host (up to 2 at once" in markdown
    assert "(RSS): rows from before PSS was recorded" in markdown
    cells = {r["config"].split()[0]: r for r in _table(markdown, "## All cells")}
    assert cells["resnet50"]["train time"].endswith(" †") and "†" not in cells["resnet18"]["train time"]


def test_max_vram_judges_the_process_figure_and_falls_back_for_older_rows(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results")
    # The allocator says 7 GiB for training, but the process held 8.6 GiB: it does not fit an 8 GiB card.
    big = _write(store, "resnet50", val_top1_best=0.9, peak_vram_train_bytes=7 * GIB,
                 peak_vram_process_bytes=int(8.6 * GIB))
    small = _write(store, "resnet18", val_top1_best=0.85, peak_vram_train_bytes=3 * GIB,
                   peak_vram_process_bytes=int(3.8 * GIB))
    older = _write(store, "resnet34", val_top1_best=0.8, peak_vram_train_bytes=5 * GIB)  # before the process figure
    advice = load(tmp_path / "results", budget=Budget(max_vram_bytes=8 * GIB)).data.advice
    assert advice.best["group_id"] == small.group_id and advice.eligible == 2
    assert big.group_id not in set(advice.picks["group_id"])
    assert older.group_id in set(load(tmp_path / "results", budget=Budget(max_vram_bytes=6 * GIB)).data.leaderboard[
        lambda b: b["vram_allocator_fallback"].astype(bool)]["group_id"])
    monkeypatch.setattr(report_plots, "PLOTS", {})
    built = build_report(tmp_path / "results", tmp_path / "out", budget=Budget(max_vram_bytes=8 * GIB))
    markdown = built.markdown.read_text()
    assert "VRAM on the card ≤ 8.00 GiB (--max-vram)" in markdown
    assert "1 ranked config(s) recorded before that figure are judged on the allocator's training peak" in markdown
    board = {r["model"]: r for r in _table(markdown, "## Leaderboard")}
    assert board["resnet50"]["VRAM on the card"] == "8.60 GiB" and board["resnet34"]["VRAM on the card"] == "–"


# ---------------------------------------------------------------- bench validate's memory risk


def _risk(target: est.Target, **peaks) -> str:
    seen = pd.DataFrame([{"model": "tv:resnet50", "freeze": "none", "batch_size": 64, "resolution": 224,
                          "status": "ok", "data_device_bytes": 0, "total_params": 25_000_000,
                          "peak_host_pss_bytes": None, "peak_host_rss_bytes": None, "peak_vram_process_bytes": None,
                          "peak_vram_allocated_bytes": None, **peaks}])
    return est._memory_risk(Cell(model="tv:resnet50", batch_size=64, resolution=224), seen, target)


def test_memory_risk_is_judged_on_pss_and_on_the_process_vram():
    cpu = est.Target("cpu", "cpu", None, 16 * GIB)
    assert _risk(cpu, peak_host_pss_bytes=6 * GIB, peak_host_rss_bytes=20 * GIB) == ""  # RSS: shared pages n times
    assert _risk(cpu, peak_host_rss_bytes=20 * GIB).startswith("~20 of 16 GiB")  # an older row: RSS is all there is
    gpu = est.Target("h100", "h100", None, 16 * GIB)
    assert _risk(gpu, peak_vram_allocated_bytes=14 * GIB) == ""
    assert _risk(gpu, peak_vram_allocated_bytes=14 * GIB, peak_vram_process_bytes=15 * GIB).startswith("~15 of 16 GiB")


# ---------------------------------------------------------------- the GPU check's VRAM goals


@pytest.mark.parametrize("process_gib, expected", [(6.9 + 0.6, True), (6.9 + 1.2, True), (6.9, False),
                                                   (6.9 + 3.0, False), (None, None)])
def test_the_gpu_check_holds_the_process_figure_to_the_reserve_plus_a_context(process_gib, expected):
    row = {"peak_vram_reserved_bytes": 6.9 * GIB,
           "peak_vram_process_bytes": None if process_gib is None else process_gib * GIB}
    assert steps_measure.process_verdict(row) is expected


@pytest.mark.parametrize("trained_mib, expected", [(700, True), (720, True), (700 + 94, False), (90, False),
                                                   (None, None)])
def test_the_gpu_check_holds_inference_vram_to_a_never_trained_models(trained_mib, expected):
    # ResNet-50's weights are 94 MiB; a never-trained model peaks at 700 MiB for one batch. Its gradients left
    # allocated would add 94 MiB; a peak under the weights cannot be.
    reference = {"weights_bytes": 94 * MIB, "infer_peak_vram_bytes": 700 * MIB}
    row = {"infer_peak_vram_bytes": None if trained_mib is None else trained_mib * MIB}
    assert steps_measure.infer_verdict(row, reference) is expected
    goals = []
    steps_measure.infer_table([{**row, "cell_id": "c", "model": "tv:resnet50", "resolution": 224, "batch_size": 128}],
                              {"c": reference}, goals)
    assert goals[0]["met"] == {True: "yes", False: "no", None: "n/a"}[expected]
