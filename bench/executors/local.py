"""The local executor: this machine's devices, every cell in its own process forked from a server that imported torch
once (`bench/forkserver.py`), or a fresh interpreter where that cannot be (`BENCH_START_METHOD=subprocess`, not
Linux). Each row says how many cells shared the host while it ran (`concurrent_cells`).

How many cells a device runs at once is the run's packing (`bench run --cells-per-gpu N|auto`, `--exclusive`; the
CLI hands them over as BENCH_CELLS_PER_GPU and BENCH_EXCLUSIVE, as BENCH_START_METHOD is): one by default; N side by
side; `auto` as many as fit by their expected VRAM (earlier rows of the same model, scaled as `bench validate` scales
them), one where that is unknown; `--exclusive` one cell on the whole machine at a time. A throughput cell always
runs alone on its device: its figure is the device's speed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import cellproc, forkserver, status
from bench.cellproc import Job, Outcome, Report
from bench.errors import BenchError
from bench.result import Process
from bench.suite import Cell
from bench.worker import preload_modules

CELLS_PER_GPU_ENV, EXCLUSIVE_ENV = "BENCH_CELLS_PER_GPU", "BENCH_EXCLUSIVE"
AUTO_MOST = 8  # auto packs at most this many cells on one device, whatever their memory
AUTO_FILL = 0.85  # ... and their expected peaks at most this share of its memory (the estimates are scaled, not exact)


@dataclasses.dataclass(frozen=True)
class Packing:
    """How many cells share a device at once: `per_device` (a number, or "auto": as many as fit by expected VRAM),
    or with `exclusive` one cell on the whole machine at a time."""

    per_device: int | str = 1
    exclusive: bool = False

    @classmethod
    def from_env(cls) -> Packing:
        text = os.environ.get(CELLS_PER_GPU_ENV, "").strip().lower() or "1"
        exclusive = os.environ.get(EXCLUSIVE_ENV, "").strip().lower() in ("1", "true", "yes")
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise BenchError(f"{CELLS_PER_GPU_ENV}={text!r} (--cells-per-gpu) is not a number of cells (1 or more) or "
                             "auto; fix it or unset it")
        packing = cls(text if text == "auto" else int(text), exclusive)
        if exclusive and packing.per_device != 1:
            raise BenchError("--exclusive runs one cell at a time on the whole machine and --cells-per-gpu packs "
                             "several on a device; pass one of them")
        return packing

    @property
    def threads(self) -> int:
        """Worker threads per device: one per cell it may run at once."""
        return 1 if self.exclusive else AUTO_MOST if self.per_device == "auto" else int(self.per_device)


@contextlib.contextmanager
def packed(cells_per_gpu: str | None, exclusive: bool, remote: bool = False) -> Iterator[Packing]:
    """`bench run --cells-per-gpu N|auto --exclusive`: set for the run as the environment the executor reads,
    checked before anything runs, and put back as it was afterwards."""
    given = {CELLS_PER_GPU_ENV: cells_per_gpu, EXCLUSIVE_ENV: "1" if exclusive else None}
    given = {name: value for name, value in given.items() if value is not None}
    if given and remote:
        raise BenchError("--cells-per-gpu and --exclusive place cells on this machine's devices, and a cluster "
                         "(--ray, --slurm) gives each cell a GPU of its own; drop them")
    before = {name: os.environ.get(name) for name in given}
    os.environ.update(given)
    try:
        yield Packing.from_env()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalExecutor:
    name = "local"

    def __init__(self, devices: Sequence[str], packing: Packing | None = None):
        self.devices = tuple(devices)
        self.packing = packing
        self.fork = False

    def __enter__(self) -> LocalExecutor:
        self.fork = forkserver.wanted()  # a bad BENCH_START_METHOD is one error line before anything runs
        self.packing = self.packing or Packing.from_env()  # so is a bad --cells-per-gpu
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]:
        """Each cell's outcome as it ends. A worker thread takes its next cell only once the runner has recorded its
        last, so each finished cell is on disk before the next starts; on Ctrl-C every cell process is killed and
        every thread joined before this returns."""
        if not jobs:
            return
        packing = self.packing or Packing.from_env()
        slots = Slots(jobs, self.devices, packing, *_expected_memory(jobs, self.devices, packing))
        with _server(self.devices, jobs) if self.fork else contextlib.nullcontext() as server:
            yield from _drain(slots, server, report)


@contextlib.contextmanager
def _server(devices: tuple[str, ...], jobs: Sequence[Job]) -> Iterator[forkserver.ForkServer]:
    """The fork server for this run, started and waited for here, in the runner's own thread, so a Ctrl-C during
    its imports stops the run at once."""
    with forkserver.ForkServer(cellproc.child_env(devices[0]), preload_modules(j.cell.model for j in jobs)) as server:
        server.wait_ready()
        yield server


class Slots:
    """Which cell runs next, and where: a device takes the first waiting cell that fits beside the cells it runs."""

    def __init__(self, jobs: Sequence[Job], devices: tuple[str, ...], packing: Packing,
                 expected: dict[str, float | None] | None = None, capacity: dict[str, float | None] | None = None):
        self.pending, self.packing = list(jobs), packing
        self.listed = collections.Counter(devices)  # a device listed twice runs twice the cells
        self.devices = tuple(self.listed)
        self.expected, self.capacity = expected or {}, capacity or {}
        self.running: dict[str, list[Job]] = {d: [] for d in self.devices}
        self._changed = threading.Condition()

    def take(self, device: str, stop: threading.Event) -> Job | None:
        """The next cell for `device`, waiting while none fits; None once none is left (or the run stops)."""
        with self._changed:
            while not stop.is_set() and self.pending:
                job = next((j for j in self.pending if self.fits(j, device)), None)
                if job is not None:
                    self.pending.remove(job)
                    self.running[device].append(job)
                    return job
                self._changed.wait(0.2)
            return None

    def done(self, device: str, job: Job) -> None:
        with self._changed:
            self.running[device].remove(job)
            self._changed.notify_all()

    def fits(self, job: Job, device: str) -> bool:
        beside = self.running[device]
        if self.packing.exclusive:
            return not any(self.running.values())
        if not beside:
            return True
        if job.cell.mode == "throughput" or any(j.cell.mode == "throughput" for j in beside):
            return False  # a throughput figure is the device's speed: never shared
        if self.packing.per_device != "auto":
            return len(beside) < int(self.packing.per_device) * self.listed[device]
        need = [self.expected.get(j.cell.id) for j in [*beside, job]]
        room = self.capacity.get(device)
        return room is not None and None not in need and sum(need) <= AUTO_FILL * room


def _expected_memory(jobs: Sequence[Job], devices: tuple[str, ...], packing: Packing) -> tuple[dict, dict]:
    """For `auto`: each cell's expected peak VRAM (bench validate's scaling of earlier rows in the run's results
    folder) and each GPU's memory (from NVML, so the runner creates no CUDA context on the GPUs it measures)."""
    if packing.per_device != "auto" or packing.exclusive:
        return {}, {}
    from bench import validate

    gpus = {d: _gpu_memory(d) for d in devices}
    capacity = {d: gpu[1] if gpu else None for d, gpu in gpus.items()}
    known = [gpu for gpu in gpus.values() if gpu]
    results = _results_folder(jobs)
    if not known or results is None:
        return {}, capacity
    name, memory = known[0]
    target = validate.Target(validate.device_class(name) or "a100", name, name, memory)
    return validate.expected_memory([j.cell for j in jobs], results=results, target=target), capacity


def _gpu_memory(device: str) -> tuple[str, int] | None:
    """(name, total bytes) of a CUDA device from NVML; None for the CPU or without NVML."""
    import torch

    from bench import measure

    found = measure._nvml_handle(torch.device(device)) if device.startswith("cuda") else None
    if found is None:
        return None
    pynvml, handle = found
    try:
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else name), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except pynvml.NVMLError:
        return None


def _results_folder(jobs: Sequence[Job]) -> Path | None:
    """The run's results folder, from a job's saved-state folder (RESULTS/SUITE/state/CELL_ID)."""
    given = next((j.state_dir for j in jobs if j.state_dir), None)
    return Path(given).parents[2] if given else None


def _drain(slots: Slots, server, report: Report) -> Iterator[tuple[Cell, Outcome]]:
    ended: queue.Queue = queue.Queue()
    stop = threading.Event()
    together = Concurrency()

    def serve(device: str) -> None:
        try:
            while (job := slots.take(device, stop)) is not None:
                try:
                    with together.cell() as shared:
                        outcome = cellproc.run_cell(job, device, server, report, stop)
                finally:
                    slots.done(device, job)
                process = outcome.parts.get("process", Process())
                outcome.parts["process"] = dataclasses.replace(process, concurrent_cells=shared.most)
                if outcome.status == status.INTERRUPTED:  # no row: the run stopped, or the fork server died under
                    continue  # this cell (the next one starts a new server); it runs again next time
                recorded = threading.Event()
                ended.put((job.cell, outcome, recorded))
                while not recorded.wait(0.2) and not stop.is_set():
                    continue
        except Exception as exc:  # noqa: BLE001 - re-raised in the runner's thread after the others stop
            ended.put(exc)
            stop.set()

    threads = [threading.Thread(target=serve, args=(d,), daemon=True) for d in slots.devices
               for _ in range(slots.packing.threads * slots.listed[d])]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads) or not ended.empty():
            try:
                item = ended.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                raise item
            cell, outcome, recorded = item
            yield cell, outcome
            recorded.set()
    finally:
        stop.set()
        for t in threads:
            t.join()


@dataclasses.dataclass(eq=False)  # identity: `remove` takes this cell, not an equal one
class _Shared:
    most: int = 1  # the most cells running at once (this one included) while this one ran


class Concurrency:
    """How many cells ran at once on this host while each one ran. Every cell of a local run shares the host's
    CPU, memory and disk with the others (and its GPU where two share a device): a cell that ran beside others
    is slower than alone, and its row says so (`concurrent_cells`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: list[_Shared] = []

    @contextlib.contextmanager
    def cell(self) -> Iterator[_Shared]:
        mine = _Shared()
        with self._lock:
            self._running.append(mine)
            for other in self._running:  # every cell running now saw this many at once
                other.most = max(other.most, len(self._running))
        try:
            yield mine
        finally:
            with self._lock:
                self._running.remove(mine)
