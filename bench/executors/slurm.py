"""The SLURM executor: each cell a SLURM job holding one GPU, submitted through submitit (`bench run --slurm
PARTITION`). `--slurm local` runs the same jobs through submitit's local executor on this machine, one at a time
(how the tests run it, on the CPU).

As with Ray, the driver keeps the results folder, its lock, resume and every write: a job runs one cell through the
same cell process as a local run (a fresh interpreter: a job is a fresh process anyway) and returns the outcome,
which submitit carries back through the job folder. So every node needs the same bench install, the datasets at the
same `--data-root` path (the driver prepares them; nodes never download), and the job folder (`BENCH_SLURM_FOLDER`,
default `./bench-slurm`) on a file system it shares with the driver. `BENCH_SLURM_PARAMETERS` (JSON) adds or
overrides submitit parameters, e.g. `{"slurm_account": "proj", "cpus_per_task": 8, "mem_gb": 64}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence

from bench import cellproc, measure, status
from bench.cellproc import Job, Outcome, Report
from bench.errors import BenchError
from bench.suite import Cell

POLL_S = {True: 0.2, False: 5.0}  # local: a process poll; SLURM: submitit asks sacct, which a cluster rations
_SLACK_MIN = 10  # a job's time limit is its cell's plus this, for the job's own start and the worker's imports
_DAY_MIN = 24 * 60  # a job's time limit when its cell has none


class SlurmExecutor:
    name = "slurm"

    def __init__(self, partition: str):
        self.partition = partition
        self.local = partition == "local"
        # On SLURM a job is given one GPU, cuda:0 inside it; locally the jobs share this machine's first GPU, or its CPU.
        self.device = "cuda:0" if not self.local or (measure.nvml_gpu_count() or 0) > 0 else "cpu"
        self._executor = None

    def __enter__(self) -> SlurmExecutor:
        submitit = _submitit()
        if not self.local and shutil.which("sbatch") is None:
            raise BenchError(f"--slurm {self.partition}: SLURM's sbatch is not on this machine's PATH; run bench on a "
                             f"login node of the cluster, or try the jobs here with --slurm local")
        folder = os.path.join(os.environ.get("BENCH_SLURM_FOLDER", "bench-slurm"), "%j")
        self._executor = submitit.AutoExecutor(folder=folder, cluster="local" if self.local else "slurm")
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]:
        """Each cell as a job, its outcome yielded as the job ends. On SLURM every job is submitted at once (the
        scheduler queues them); locally one runs at a time, as cells do on one device. Closing early cancels every
        job still queued or running."""
        self._executor.update_parameters(**self._parameters(jobs))
        waiting = [dataclasses.replace(job, download=False) for job in jobs]  # the driver fetched what it could
        window = 1 if self.local else len(waiting)
        running: dict = {}
        try:
            while waiting or running:
                while waiting and len(running) < window:
                    job = waiting.pop(0)
                    running[self._submit(job)] = job.cell
                finished = [j for j in running if j.done()]
                if not finished:
                    time.sleep(POLL_S[self.local])
                for submitted in finished:
                    yield running.pop(submitted), self._outcome(submitted)
        finally:
            for submitted in running:
                submitted.cancel(check=False)

    def _submit(self, job: Job):
        try:
            return self._executor.submit(run_on_node, job, self.device)
        except _submitit().core.utils.FailedSubmissionError as exc:
            first = (str(exc).strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"SLURM refused a job ({first}); check the partition and BENCH_SLURM_PARAMETERS "
                             f"(an account or QOS the cluster asks for)") from None

    def _parameters(self, jobs: Sequence[Job]) -> dict:
        limits = [j.timeout_s for j in jobs]
        minutes = _DAY_MIN if None in limits or not limits else int(max(limits) // 60) + 1 + _SLACK_MIN
        params = {"timeout_min": minutes, "nodes": 1, "tasks_per_node": 1, "name": "bench",
                  "gpus_per_node": 1 if self.device.startswith("cuda") else 0}
        if self.partition and not self.local:
            params["slurm_partition"] = self.partition
        try:
            params.update(json.loads(os.environ.get("BENCH_SLURM_PARAMETERS") or "{}"))
        except json.JSONDecodeError as exc:
            raise BenchError(f"BENCH_SLURM_PARAMETERS is not JSON ({exc.msg}); write it as "
                             f"'{{\"slurm_account\": \"proj\"}}'") from None
        return params

    def _outcome(self, submitted) -> Outcome:
        """The job's outcome; a job that ended without one (cancelled, out of time, its node lost) gives a row
        that says so, and a job in which bench itself failed stops the run."""
        submitit = _submitit()
        try:
            return submitted.result()
        except submitit.core.utils.FailedJobError as exc:
            first = (str(exc).strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"SLURM job {submitted.job_id} failed in bench itself ({first}); check that bench and its "
                             f"dependencies are installed on the nodes, in the driver's version") from None
        except submitit.core.utils.UncompletedJobError as exc:
            state = submitted.state
            outcome = cellproc.without_process("cpu", status.lost(state),
                                               f"the SLURM job {submitted.job_id} ended without a result ({state})")
            cellproc.correct_provenance(outcome, device=self.device, hostname=None, gpu_name=None)  # not the driver's
            outcome.log = str(exc)
            return outcome


def run_on_node(job: Job, device: str) -> Outcome:
    """The job body: one cell through the cell process, on the node SLURM chose."""
    return cellproc.run_cell(job, device, None, lambda event: None, threading.Event())


def _submitit():
    try:
        import submitit
    except ImportError:
        raise BenchError("--slurm needs submitit, which is not installed; run `pip install 'bench[slurm]'`") from None
    return submitit
