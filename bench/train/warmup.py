"""A cell's warm-up: cuDNN's autotuning set where it repays itself (`cudnn_benchmark: auto`), and, when asked
(`BENCH_PROFILE_WARMUP=1`), a profile of the first steps written to the cell's log.

On an H200 every cell's first 20 steps cost 11-39 s (EfficientNet-B0 38.6 s, ViT-B/16 3.7 s; benchmarks/RESULTS.md),
most likely cuDNN trying algorithms for every new convolution shape. The profile says where that time goes: each
step's seconds, and the profiler's operators grouped by cause (cuDNN's convolutions, where autotuning runs; kernel
launches, where CUDA loads modules lazily; the allocator growing; host syncs).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

from bench.measure import sync
from bench.suite import Cell
from bench.train.step import Plan

# cudnn_benchmark: auto turns autotuning on where a cell trains on at least this many pixels (steps x batch x side^2):
# about 1,800 steps of ResNet-50 at 224 px and batch 128, what repays its 11 s of autotuning on an H200 if autotuned
# steps are 20 % faster. A first guess, to be replaced by the GPU check's measurement (step `suite`).
CUDNN_AUTO_MIN_PIXELS = 10**10
# Algorithms cuDNN tries per shape when autotuning (torch's own default, 10, made explicit so a change of torch's
# default cannot change our timings unseen); BENCH_CUDNN_BENCHMARK_LIMIT overrides it (0: try every one).
CUDNN_BENCHMARK_LIMIT = 10
PROFILE_ENV, PROFILE_STEPS = "BENCH_PROFILE_WARMUP", 20
# Profiler event names by what they spend the warm-up on (first match wins; matched case-insensitively).
CAUSES = (("convolutions (cuDNN's autotuning runs inside them)", ("cudnn", "convolution")),
          ("kernel launches (lazy module loading inside)", ("launchkernel", "cumoduleload", "culibraryload",
                                                            "cudagetfuncbysymbol")),
          ("allocator growth", ("cudamalloc", "cudafree", "cudahostalloc")),
          ("host syncs and copies", ("synchronize", "cudamemcpy", "item", "_local_scalar_dense")))


def resolve_cudnn_benchmark(cell: Cell, plan: Plan) -> bool:
    """The cell's setting; for auto (None): on in throughput mode (its warm-up is timed apart), else where the
    cell's steps repay the autotuning."""
    if cell.cudnn_benchmark is not None:
        return cell.cudnn_benchmark
    if cell.mode == "throughput":
        return True
    return plan.total_steps * cell.batch_size * cell.resolution**2 >= CUDNN_AUTO_MIN_PIXELS


def configure_cudnn(cell: Cell, plan: Plan, device: torch.device) -> bool:
    """Set cuDNN's autotuning for this cell (on a GPU; the CPU has no cuDNN) and return the setting used."""
    benchmark = resolve_cudnn_benchmark(cell, plan)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark
        if hasattr(torch.backends.cudnn, "benchmark_limit"):
            limit = os.environ.get("BENCH_CUDNN_BENCHMARK_LIMIT", "").strip()
            torch.backends.cudnn.benchmark_limit = int(limit) if limit.isdigit() else CUDNN_BENCHMARK_LIMIT
    return benchmark


@contextlib.contextmanager
def profiled(stepper, cell: Cell, device: torch.device, out=None):
    """The stepper itself, or with BENCH_PROFILE_WARMUP=1 one whose first steps are profiled into `out` (stderr:
    the cell's log); the table is written by the last of those steps, or on leaving if the cell ran fewer."""
    if os.environ.get(PROFILE_ENV, "").strip() not in ("1", "true", "yes"):
        yield stepper
        return
    steps = ProfiledSteps(stepper, cell, device, PROFILE_STEPS, out)
    try:
        yield steps
    finally:
        steps.close()


class ProfiledSteps:
    """A stepper's first `steps` calls, each timed after a synchronise, under torch.profiler; `close` (or the last of
    them) writes the table. Everything else is the stepper's own (attributes pass through)."""

    def __init__(self, stepper, cell: Cell, device: torch.device, steps: int, out=None):
        self.stepper, self.cell, self.device, self.steps = stepper, cell, device, steps
        self.out = out
        self.seconds: list[float] = []
        self.profiler = None
        self.done = False

    def __getattr__(self, name: str):
        return getattr(self.stepper, name)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.done:
            return self.stepper(x, y)
        if self.profiler is None:
            self.profiler = torch.profiler.profile(activities=_activities(self.device))
            self.profiler.__enter__()
        sync(self.device)
        started = time.perf_counter()
        self.stepper(x, y)
        sync(self.device)
        self.seconds.append(time.perf_counter() - started)
        if len(self.seconds) >= self.steps:
            self.close()

    def close(self) -> None:
        """Stop profiling and write the table (once; nothing when no step ran)."""
        if self.done or self.profiler is None:
            self.done = True
            return
        self.done = True
        self.profiler.__exit__(None, None, None)
        print(profile_table(self.cell, self.device, self.stepper, self.seconds, self.profiler.key_averages()),
              file=self.out or sys.stderr, flush=True)


def _activities(device: torch.device) -> list:
    kinds = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        kinds.append(torch.profiler.ProfilerActivity.CUDA)
    return kinds


def profile_table(cell: Cell, device: torch.device, stepper, seconds: list[float], events) -> str:
    """Per-step seconds, the excess over the steady step, where the profiler saw the time go, the top operators."""
    tail = seconds[-5:] if len(seconds) > 5 else seconds[-1:]
    steady = statistics.median(tail)
    excess = sum(max(0.0, s - steady) for s in seconds)
    settings = (f"cudnn.benchmark={torch.backends.cudnn.benchmark if device.type == 'cuda' else 'n/a (cpu)'}, "
                f"benchmark_limit={getattr(torch.backends.cudnn, 'benchmark_limit', 'n/a')}, "
                f"cuda_graphs={getattr(stepper, 'cuda_graphs', 'off')}")
    lines = [f"warm-up profile ({PROFILE_ENV}): the first {len(seconds)} steps of cell {cell.id} ({cell.model}, "
             f"{cell.resolution} px, batch {cell.batch_size}) on {device}; {settings}",
             "step  seconds", *(f"{i + 1:>4}  {s:.4f}" for i, s in enumerate(seconds)),
             f"steady step (median of the last {len(tail)}): {steady:.4f} s; warm-up excess over it: {excess:.3f} s",
             "where the profiled time went (self CPU time of the operators and CUDA API calls, every thread, s):"]
    lines += [f"  {name}: {total:.3f}" for name, total in causes(events).items()]
    table = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
    return "\n".join([*lines, "top operators by self CPU time:", table])


def causes(events) -> dict[str, float]:
    """Self CPU seconds by cause (CAUSES), the rest as `other`."""
    totals = {name: 0.0 for name, _ in CAUSES} | {"other": 0.0}
    for event in events:
        key = event.key.lower()
        name = next((n for n, words in CAUSES if any(w in key for w in words)), "other")
        totals[name] += event.self_cpu_time_total / 1e6
    return totals
