"""Executors run cells somewhere and say how each ended; they never write results or decide what runs.

One interface, three places: this machine's devices (`local`), a Ray cluster (`ray`), a SLURM cluster through
submitit (`slurm`). Each runs a cell through `bench.cellproc.run_cell`, so a cell's limits, kills and statuses
are the same wherever it runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from bench.cellproc import Job, Outcome, Report
from bench.errors import BenchError
from bench.executors.local import LocalExecutor
from bench.executors.ray import RayExecutor
from bench.executors.slurm import SlurmExecutor
from bench.suite import Cell


class Executor(Protocol):
    """Where a run's cells run. Entering connects (before the runner locks the results folder, so a bad address
    changes nothing); `run` yields each cell's outcome as it ends, and closing its iterator early stops every cell
    still running, before the runner unlocks the folder."""

    name: str

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc) -> None: ...

    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]: ...


def create(devices: tuple[str, ...], ray: str | None = None, slurm: str | None = None) -> Executor:
    """The executor a run asks for: a Ray address, a SLURM partition, or else this machine's `devices`."""
    if ray is not None and slurm is not None:
        raise BenchError("--ray and --slurm both choose where cells run; pass one of them")
    if ray is not None:
        return RayExecutor(ray)
    if slurm is not None:
        return SlurmExecutor(slurm)
    return LocalExecutor(devices)
