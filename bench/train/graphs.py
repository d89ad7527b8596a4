"""CUDA graphs for static-shape training steps (`cuda_graphs: auto | on | off`).

The device-resident loader yields batches of one shape, so a whole step (forward, loss, backward, optimizer,
metric sums) can be captured once and then replayed: one launch instead of hundreds. Small images are where that
pays: on an H200, ResNet-50 trained at 4,876 img/s at 32 px and 4,283 at 224 px, so at 32 px the GPU mostly waits
for the host to launch kernels (benchmarks/RESULTS.md).

A replay reruns the recorded kernels on the same memory, and nothing else. So the step never depends on Python
values that change: the learning rate is a tensor on the device that the schedule fills before each replay (fused
optimizers read it there, Adam's step count lives there too), a batch is copied into the captured input tensors,
and the metric sums are added into in place. fp16 stays eager: its gradient scaler reads an inf check on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from bench.suite import Cell
from bench.train.step import Plan, Stepper

# Eager steps before the capture, on a side stream as torch asks: cuDNN picks its algorithms, the optimizer makes
# its state and the allocator grows there, so none of it happens inside the graph.
GRAPH_WARMUP_STEPS = 3
# `auto` captures a batch of at most this many pixels (32 px up to batch 512, 64 px up to batch 128): below it a
# step's kernels are too short to hide their launches; above it the graph saves a few per cent at best.
AUTO_MAX_PIXELS = 128 * 64 * 64


def resolve_cuda_graphs(cell: Cell, plan: Plan, device: torch.device, cached: bool = False) -> tuple[str, str | None]:
    """'on' or 'off' for this cell on this device, and a one-line note where `on` cannot be honoured (`auto` falls
    back silently)."""
    if cell.cuda_graphs == "off":
        return "off", None
    why = _why_not(cell, plan, device, cached)
    if why:
        return "off", f"cuda_graphs: on, but {why}; the steps run eagerly" if cell.cuda_graphs == "on" else None
    if cell.cuda_graphs == "auto" and cell.batch_size * cell.resolution**2 > AUTO_MAX_PIXELS:
        return "off", None
    return "on", None


def _why_not(cell: Cell, plan: Plan, device: torch.device, cached: bool) -> str | None:
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if cached:
        return "a cached-feature probe trains its head on features computed once (no step to capture)"
    if plan.precision == "fp16":
        return "fp16's gradient scaler reads its inf check on the host every step"
    if cell.compile:
        return "compile is on (torch.compile's mode reduce-overhead captures its own graphs)"
    return None


def make_stepper(module: nn.Module, cell: Cell, plan: Plan, device: torch.device, forward, setting: str,
                 warn: Callable[[str], None]) -> Stepper:
    """The eager Stepper, or with `setting` 'on' the one that replays a captured graph."""
    if setting == "on":
        return GraphStepper(module, cell, plan, device, forward, warn=warn)
    return Stepper(module, cell, plan, device, forward)


class CudaGraph:
    """torch.cuda's graph API as GraphStepper uses it (a test puts a CPU stand-in in its place)."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def warming(self):
        """Eager warm-up steps on a side stream, joined back to the current one."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """Record `step` (it does not run) and return what replays it."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a streaming loader's pin-memory thread may allocate pinned memory while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        return graph.replay


class GraphStepper(Stepper):
    """A Stepper whose steps, after GRAPH_WARMUP_STEPS eager ones, replay one captured CUDA graph. A capture that
    fails, or a batch of another shape, turns the rest of the cell eager, said once through `warn`."""

    cuda_graphs = "on"
    FUSED = True

    def __init__(self, module: nn.Module, cell: Cell, plan: Plan, device: torch.device, forward=None,
                 graphs=None, warn: Callable[[str], None] = print):
        super().__init__(module, cell, plan, device, forward)
        for group in self.opt.param_groups:
            if "capturable" in group:  # Adam's and AdamW's step count on the device, as a replay needs it
                group["capturable"] = device.type == "cuda"
        self.graphs = graphs if graphs is not None else CudaGraph(device)
        self.warn = warn
        self.warmed = 0
        self.replay: Callable[[], None] | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.replay is not None and not self.eager and self._same_shape(x, y):
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.replay()
        elif self.eager or self.replay is not None:
            if not self.eager:
                captured = tuple(self.static[0].shape)
                self._give_up(f"a batch of shape {tuple(x.shape)} came after the graph of {captured}")
            self.step(x, y)
        elif self.warmed < GRAPH_WARMUP_STEPS:
            self._device_lrs()
            with self.graphs.warming():
                self.step(x, y, cache=False)
            self.warmed += 1
        else:
            self._capture(x, y)
        self.sched.step()  # fills the learning-rate tensors in place: the next replay reads them
        self.seen += len(y)

    def _same_shape(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.shape == self.static[0].shape and y.shape == self.static[1].shape

    def _device_lrs(self) -> None:
        """Each group's learning rate as a tensor on the device (a resumed state brings it back as a float or on the
        CPU); the schedule then writes into it instead of replacing it."""
        for group in self.opt.param_groups:
            lr = group["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == self.device and lr.dtype == torch.float32):
                group["lr"] = torch.tensor(float(lr), device=self.device)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (x.clone(), y.clone())
        try:
            self.replay = self.graphs.capture(lambda: self.step(*self.static, cache=False))
        except RuntimeError as exc:  # a host sync or a dynamic shape inside the model: it cannot be captured
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            self.cuda_graphs = "off"
            self._give_up(f"the capture failed ({type(exc).__name__}: {first})")
            self.step(x, y)
            return
        self.replay()  # capturing recorded this batch's step without running it

    def _give_up(self, why: str) -> None:
        self.eager = True
        self.warn(f"cuda_graphs: {why}; the rest of the cell runs eagerly")
