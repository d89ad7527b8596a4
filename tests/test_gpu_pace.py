"""Issue 23, a suite's GPU time: CUDA-graph steps (`cuda_graphs`), cuDNN autotuning where it repays itself
(`cudnn_benchmark: auto`), the warm-up profile. The graph stepper's bookkeeping is checked on the CPU with a stand-in
for torch.cuda's graph API that, like a real capture, records the step without running it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from bench import data, models, train
from bench.result import CellResult, Identity, Provenance, Training
from bench.suite import Cell
from bench.train import graphs, warmup
from bench.train.step import Plan, Stepper

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL = dict(dataset="synthetic", resolution=32, batch_size=16, train_subset=64, test_subset=32, pretrained=False,
             model="tv:resnet18", steps=3)


def run(cell: Cell, events: list):
    splits = data.load_splits(cell.dataset, val_fraction=cell.val_fraction, train_subset=cell.train_subset,
                              test_subset=cell.test_subset)
    torch.manual_seed(cell.seed)
    classes = len(splits.classes)
    return train.run_cell(cell, splits, models.build(cell, classes), CPU, classes, events.append)


# ---------------------------------------------------------------- the settings and the row


def test_the_settings_take_auto_and_yaml_booleans_and_ids_stay():
    assert Cell(model="m", cuda_graphs=True).cuda_graphs == "on"  # YAML 1.1 reads a bare on as true
    assert Cell(model="m", cuda_graphs=False).cuda_graphs == "off"
    assert Cell(model="m", cudnn_benchmark="auto").cudnn_benchmark is None  # auto, held so the column stays a bool
    assert Cell(model="m", cudnn_benchmark=False).cudnn_benchmark is False
    assert Cell(model="m").id == Cell(model="m", cuda_graphs="auto", cudnn_benchmark=True).id  # the defaults
    with pytest.raises(ValueError):
        Cell(model="m", cuda_graphs="sometimes")


def test_rows_hold_the_values_used_in_place_of_auto():
    cell = Cell(model="m", cudnn_benchmark="auto")
    parts = {"training": Training(cuda_graphs="off"), "provenance": Provenance(cudnn_benchmark=True)}
    row = CellResult(Identity(cell_id=cell.id), cell, parts).row()
    assert row["cuda_graphs"] == "off" and row["cudnn_benchmark"] is True
    unreported = CellResult(Identity(cell_id=cell.id), cell, {}).row()  # a worker that never reported: the setting
    assert unreported["cuda_graphs"] == "auto" and unreported["cudnn_benchmark"] is None


def test_auto_captures_small_images_on_cuda_only_where_it_is_safe():
    plan = Plan("bf16", 0.1, 10, 100, 5)

    def resolve(plan=plan, device=CUDA, cached=False, **fields):
        return graphs.resolve_cuda_graphs(Cell(model="m", **fields), plan, device, cached)

    assert resolve() == ("on", None)  # 32 px, batch 128
    assert resolve(resolution=224) == ("off", None)  # compute-bound: auto leaves it
    assert resolve(resolution=224, cuda_graphs="on") == ("on", None)  # asked for: honoured
    assert resolve(plan=Plan("fp16", 0.1, 10, 100, 5)) == ("off", None)  # auto: silently off
    for kwargs, word in [(dict(plan=Plan("fp16", 0.1, 10, 100, 5)), "scaler"), (dict(compile=True), "compile"),
                         (dict(device=CPU), "cpu"), (dict(cached=True), "cached")]:
        setting, note = resolve(cuda_graphs="on", **kwargs)
        assert setting == "off" and word in note and "eagerly" in note, kwargs


def test_on_falls_back_to_eager_on_the_cpu_in_one_line_and_auto_says_nothing():
    events: list = []
    outcome = run(Cell(**SMALL, cuda_graphs="on"), events)
    warnings = [e["text"] for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1 and "cuda_graphs: on" in warnings[0] and "cpu" in warnings[0]
    assert outcome.row["cuda_graphs"] == "off" and outcome.row["top1"] is not None
    events.clear()
    assert run(Cell(**SMALL), events).row["cuda_graphs"] == "off"
    assert not [e for e in events if e["kind"] == "warning"]


def test_cudnn_benchmark_auto_is_on_where_the_steps_repay_it():
    small, big = Plan("bf16", 0.1, 10, 50, 0), Plan("bf16", 0.1, 400, 2000, 0)

    def resolve(plan, **fields):
        return warmup.resolve_cudnn_benchmark(Cell(model="m", cudnn_benchmark="auto", **fields), plan)

    assert resolve(small) is False and resolve(big, resolution=224) is True and resolve(big) is False  # 32 px
    assert resolve(small, mode="throughput") is True  # its warm-up is timed apart from its figure
    assert warmup.resolve_cudnn_benchmark(Cell(model="m", cudnn_benchmark=True), small) is True


def test_the_cpu_leaves_cudnn_alone():
    before = torch.backends.cudnn.benchmark
    assert warmup.configure_cudnn(Cell(model="m", cudnn_benchmark=not before), Plan("fp32", 0.1, 1, 1, 0), CPU) is (
        not before)
    assert torch.backends.cudnn.benchmark is before


# ---------------------------------------------------------------- the graph stepper, on a CPU stand-in


class FakeGraphs:
    """torch.cuda's graph API on the CPU: a capture records the step without running it; a replay runs what was
    recorded, on the tensors it was recorded with."""

    def __init__(self, fail: bool = False):
        self.fail, self.captures, self.replays = fail, 0, 0

    def warming(self):
        return contextlib.nullcontext()

    def capture(self, step):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

        def replay():
            self.replays += 1
            step()

        return replay


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    # no bias before the norm: its gradient is zero up to rounding, which Adam would blow up to a full step
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


def batches(n: int, size: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)]


def both(optimizer: str, steps: int, stand_in: FakeGraphs, data=None):
    cell = Cell(model="m", optimizer=optimizer, weight_decay=0.01, warmup_fraction=0.2)
    plan = Plan("fp32", 0.05, steps, steps, 2)
    eager, graphed = Stepper(tiny_net(), cell, plan, CPU), None
    said: list[str] = []
    graphed = graphs.GraphStepper(tiny_net(), cell, plan, CPU, graphs=stand_in, warn=said.append)
    for x, y in data or batches(steps):
        eager(x, y)
        graphed(x, y)
    return eager, graphed, said


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_replayed_steps_train_as_eager_ones_do(optimizer):
    stand_in = FakeGraphs()
    eager, graphed, said = both(optimizer, 8, stand_in)
    assert stand_in.captures == 1 and stand_in.replays == 8 - graphs.GRAPH_WARMUP_STEPS and not said
    for a, b in zip(eager.module.state_dict().values(), graphed.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)  # fused and foreach kernels round apart
    assert graphed.read() == pytest.approx(eager.read(), rel=1e-5) and graphed.seen == eager.seen == 64
    assert graphed.lr == pytest.approx(eager.lr) and graphed.cuda_graphs == "on"


def test_the_schedule_writes_into_the_learning_rate_the_graph_reads():
    eager, graphed, _ = both("sgd", 5, FakeGraphs())
    lrs = [g["lr"] for g in graphed.opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs)  # never a float baked into the capture
    graphed(*batches(1)[0])
    assert [g["lr"] for g in graphed.opt.param_groups] == lrs  # the same tensors, refilled in place
    eager(*batches(1)[0])
    assert float(lrs[0]) == pytest.approx(eager.lr)


def test_reset_zeroes_the_sums_the_graph_adds_into():
    _, graphed, _ = both("sgd", 5, FakeGraphs())
    sums = graphed.loss_sum
    graphed.reset()
    graphed(*batches(1)[0])
    assert graphed.loss_sum is sums and graphed.seen == 8 and graphed.read()[0] > 0


def test_a_failed_capture_or_a_new_shape_turns_the_cell_eager_in_one_line():
    stand_in = FakeGraphs(fail=True)
    eager, graphed, said = both("sgd", 6, stand_in)
    assert stand_in.captures == 1 and len(said) == 1
    assert "capture failed (RuntimeError: operation not permitted" in said[0]
    assert graphed.cuda_graphs == "off" and graphed.read() == pytest.approx(eager.read(), rel=1e-5)
    stand_in = FakeGraphs()
    data = batches(5) + batches(2, size=4)  # a smaller batch after the capture
    eager, graphed, said = both("sgd", 7, stand_in, data)
    assert len(said) == 1 and "shape (4, 3, 8, 8)" in said[0] and stand_in.replays == 2
    assert graphed.read() == pytest.approx(eager.read(), rel=1e-5)


def test_a_resumed_state_gets_its_learning_rate_back_on_the_device():
    _, graphed, _ = both("adamw", 2, FakeGraphs())  # still warming: the next call is eager
    state = graphed.opt.state_dict()
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])  # as an eager cell's checkpoint holds it
    graphed.opt.load_state_dict(state)
    graphed(*batches(1)[0])
    assert all(isinstance(g["lr"], torch.Tensor) for g in graphed.opt.param_groups)


# ---------------------------------------------------------------- the warm-up profile


def test_the_warm_up_profile_goes_to_the_cells_log_when_asked(monkeypatch, capsys):
    run(Cell(**SMALL), [])
    assert "warm-up profile" not in capsys.readouterr().err
    monkeypatch.setenv(warmup.PROFILE_ENV, "1")
    outcome = run(Cell(**SMALL), [])
    log = capsys.readouterr().err
    assert outcome.row["steps_run"] == 3 and "warm-up profile (BENCH_PROFILE_WARMUP): the first 3 steps" in log
    lines = log.splitlines()
    first = lines.index("step  seconds")
    assert [line.split()[0] for line in lines[first + 1:first + 4]] == ["1", "2", "3"]
    label = "convolutions (cuDNN's autotuning runs inside them): "
    assert label in log and "top operators by self CPU time" in log
    assert float(log.split(label)[1].split()[0]) > 0  # ResNet-18's convolutions


# ---------------------------------------------------------------- on a GPU (the GPU check's step 2)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_step_captured_on_the_gpu_trains_as_the_eager_one(optimizer):
    cuda = torch.device("cuda:0")
    cell = Cell(model="m", optimizer=optimizer, weight_decay=0.01, warmup_fraction=0.2, precision="fp32")
    plan = Plan("fp32", 0.05, 8, 8, 2)
    said: list[str] = []
    eager = Stepper(tiny_net().to(cuda), cell, plan, cuda)
    graphed = graphs.GraphStepper(tiny_net().to(cuda), cell, plan, cuda, warn=said.append)
    for x, y in batches(8):
        eager(x.to(cuda), y.to(cuda))
        graphed(x.to(cuda), y.to(cuda))
    assert not said and graphed.replay is not None and graphed.cuda_graphs == "on"
    for a, b in zip(eager.module.state_dict().values(), graphed.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)  # cuDNN's algorithms may differ in rounding
    assert graphed.read() == pytest.approx(eager.read(), rel=1e-3) and graphed.lr == pytest.approx(eager.lr)


@pytest.mark.gpu
def test_a_small_cell_on_the_gpu_replays_a_graph_and_says_so():
    cuda = torch.device("cuda:0")
    cell = Cell(**{**SMALL, "steps": 8}, cudnn_benchmark=False)
    splits = data.load_splits("synthetic", train_subset=160, test_subset=32)
    events: list = []
    outcome = train.run_cell(cell, splits, models.build(cell, 10), cuda, 10, events.append)
    assert not [e for e in events if e["kind"] == "warning"]
    assert outcome.row["cuda_graphs"] == "on" and outcome.row["precision"] == "bf16" and outcome.row["top1"] is not None
