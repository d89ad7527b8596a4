"""The local executor: this machine's devices, one cell per device at a time (a thread each), every cell in its
own process forked from a server that imported torch once (`bench/forkserver.py`), or a fresh interpreter
where that cannot be (`BENCH_START_METHOD=subprocess`, not Linux). Each row says how many cells shared the host
while it ran (`concurrent_cells`)."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Iterator, Sequence

from bench import cellproc, forkserver, status
from bench.cellproc import Job, Outcome, Report
from bench.result import Process
from bench.suite import Cell
from bench.worker import preload_modules


class LocalExecutor:
    name = "local"

    def __init__(self, devices: Sequence[str]):
        self.devices = tuple(devices)
        self.fork = False

    def __enter__(self) -> LocalExecutor:
        self.fork = forkserver.wanted()  # a bad BENCH_START_METHOD is one error line before anything runs
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]:
        """Each cell's outcome as it ends. A device takes its next cell only once the runner has recorded its last,
        so each finished cell is on disk before the next starts; on Ctrl-C every cell process is killed and every
        thread joined before this returns."""
        if not jobs:
            return
        with _server(self.devices, jobs) if self.fork else contextlib.nullcontext() as server:
            yield from _drain(jobs, self.devices, server, report)


@contextlib.contextmanager
def _server(devices: tuple[str, ...], jobs: Sequence[Job]) -> Iterator[forkserver.ForkServer]:
    """The fork server for this run, started and waited for here, in the runner's own thread, so a Ctrl-C during
    its imports stops the run at once."""
    with forkserver.ForkServer(cellproc.child_env(devices[0]), preload_modules(j.cell.model for j in jobs)) as server:
        server.wait_ready()
        yield server


def _drain(jobs: Sequence[Job], devices: tuple[str, ...], server, report: Report) -> Iterator[tuple[Cell, Outcome]]:
    todo: queue.SimpleQueue[Job] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    ended: queue.Queue = queue.Queue()
    stop = threading.Event()
    together = Concurrency()

    def serve(device: str) -> None:
        try:
            while not stop.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                with together.cell() as shared:
                    outcome = cellproc.run_cell(job, device, server, report, stop)
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

    threads = [threading.Thread(target=serve, args=(d,), daemon=True) for d in devices]
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
