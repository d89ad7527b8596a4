"""The SLURM executor: each cell a SLURM job, submitted through submitit (`bench run --slurm PARTITION`). A job
holds one GPU where the partition has GPUs (sinfo's GRES, or `gpus_per_node` in `BENCH_SLURM_PARAMETERS`), and
its node's CPUs otherwise. `--slurm local` runs the same jobs through submitit's local executor on this machine,
one at a time.

As with Ray, the driver keeps the results folder, its lock, resume and every write: a job runs one cell through the
same cell process as a local run (a fresh interpreter: a job is a fresh process anyway) and returns the outcome,
which submitit carries back through the job folder. So every node needs the same bench install, the datasets at the
same `--data-root` path (the driver prepares them; nodes never download), and the job folder (`BENCH_SLURM_FOLDER`,
default `./bench-slurm`) on a file system it shares with the driver. `BENCH_SLURM_PARAMETERS` (JSON) adds or
overrides submitit parameters, e.g. `{"slurm_account": "proj", "cpus_per_task": 8, "mem_gb": 64}`.

How a job ends is the scheduler's to say: a job SLURM ends (its time limit, scancel, a requeue or preemption)
leaves no outcome (`run_on_node` waits for SLURM's kill rather than report the cell's process killed under it), so
its row comes from the job's state in sacct, and a requeued job runs its cell again, resuming from its saved state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
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
_ENDING_WAIT_S = 300  # how long a job SLURM is ending waits for its kill (KillWait, 30 s by default) before reporting
_FINAL_STATE_S = 60  # how long the driver waits for sacct's final state of a job whose cell was killed
_SACCT_EVERY_S = 15  # the driver asks sacct at least this often (submitit's own delay grows to 10 min)
_STILL_GOING = {"", "UNKNOWN", "PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


class SlurmExecutor:
    name = "slurm"

    def __init__(self, partition: str):
        self.partition = partition
        self.local = partition == "local"
        # On SLURM a job is given one GPU (cuda:0 inside it) where the partition has them; locally the jobs share
        # this machine's first GPU, or its CPU. SLURM's is settled on entering, once the partition is known.
        self.device = "cuda:0" if not self.local or (measure.nvml_gpu_count() or 0) > 0 else "cpu"
        self._executor = None

    def __enter__(self) -> SlurmExecutor:
        submitit = _submitit()
        if not self.local:
            if shutil.which("sbatch") is None:
                raise BenchError(f"--slurm {self.partition}: SLURM's sbatch is not on this machine's PATH; run bench "
                                 f"on a login node of the cluster, or try the jobs here with --slurm local")
            self.device = "cuda:0" if self._gpus() else "cpu"
        folder = os.path.join(os.environ.get("BENCH_SLURM_FOLDER", "bench-slurm"), "%j")
        self._executor = submitit.AutoExecutor(folder=folder, cluster="local" if self.local else "slurm")
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _gpus(self) -> int:
        """GPUs a job asks for: `gpus_per_node` from BENCH_SLURM_PARAMETERS, else 1 where the partition's nodes
        have GPUs (sinfo's GRES) and 0 where they have none (said in one line: cells run on the nodes' CPUs)."""
        asked = _user_parameters().get("gpus_per_node")
        if asked is not None:
            return int(asked)
        name, gres = partition_gres(self.partition)
        if any(g.startswith("gpu") for g in gres):
            return 1
        print(f"slurm: partition {name} has no GPUs (sinfo lists no gpu GRES on its nodes): each cell runs on its "
              f"node's CPUs; set gpus_per_node in BENCH_SLURM_PARAMETERS to ask for GPUs anyway", file=sys.stderr)
        return 0
    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]:
        """Each cell as a job, its outcome yielded as the job ends. On SLURM every job is submitted at once (the
        scheduler queues them); locally one runs at a time, as cells do on one device. Closing early cancels every
        job still queued or running."""
        self._executor.update_parameters(**self._parameters(jobs))
        waiting = [dataclasses.replace(job, download=False) for job in jobs]  # the driver fetched what it could
        window = 1 if self.local else len(waiting)
        running: dict = {}
        asked = time.monotonic()
        try:
            while waiting or running:
                while waiting and len(running) < window:
                    job = waiting.pop(0)
                    running[self._submit(job)] = job.cell
                if not self.local and running and time.monotonic() - asked > _SACCT_EVERY_S:
                    next(iter(running)).watcher.update()  # one sacct call for every job: how the ended ones ended
                    asked = time.monotonic()
                finished = [j for j in running if j.done()]
                if not finished:
                    time.sleep(POLL_S[self.local])
                for submitted in finished:
                    yield running.pop(submitted), self._outcome(submitted)
        finally:
            for submitted in running:
                submitted.cancel(check=False)

    def _submit(self, job: Job):
        errors = _submitit().core.utils
        try:
            return self._executor.submit(run_on_node, job, self.device)
        except (errors.FailedSubmissionError, errors.FailedJobError) as exc:  # sbatch's own error is the latter
            first = (str(exc).strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"SLURM refused a job ({first}); check the partition and BENCH_SLURM_PARAMETERS "
                             f"(an account, QOS or GPU request the cluster asks for)") from None

    def _parameters(self, jobs: Sequence[Job]) -> dict:
        limits = [j.timeout_s for j in jobs]
        minutes = _DAY_MIN if None in limits or not limits else int(max(limits) // 60) + 1 + _SLACK_MIN
        params = {"timeout_min": minutes, "nodes": 1, "tasks_per_node": 1, "name": "bench"}
        if self.device.startswith("cuda"):  # a partition without GPUs refuses any gres request, 0 included
            params["gpus_per_node"] = 1
        if self.partition and not self.local:
            params["slurm_partition"] = self.partition
        return {**params, **_user_parameters()}

    def _outcome(self, submitted) -> Outcome:
        """The job's outcome; a job that ended without one (cancelled, out of time, its node lost) gives a row
        that says so, and a job in which bench itself failed stops the run."""
        submitit = _submitit()
        try:
            outcome = submitted.result()
        except submitit.core.utils.FailedJobError as exc:
            first = (str(exc).strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"SLURM job {submitted.job_id} failed in bench itself ({first}); check that bench and its "
                             f"dependencies are installed on the nodes, in the driver's version") from None
        except submitit.core.utils.UncompletedJobError as exc:
            state = submitted.state
            outcome = cellproc.without_process("cpu", status.lost(state),
                                               f"the SLURM job {submitted.job_id} ended without a result ({state})")
            cellproc.correct_provenance(outcome, device=self.device, hostname=None, gpu_name=None,  # not the driver's
                                        scheduler_job_id=str(submitted.job_id))
            outcome.log = f"SLURM job {submitted.job_id}: {state}\n{exc}"
            return outcome
        if outcome.status == status.KILLED and not self.local:
            _scheduler_verdict(outcome, submitted)
        return outcome


def _scheduler_verdict(outcome: Outcome, submitted) -> None:
    """A cell process killed inside a job that went on (the cgroup's OOM killer picks the biggest process, the
    cell's) is what the scheduler says the job's steps ended as: a step OUT_OF_MEMORY is an `oom` row."""
    deadline = time.monotonic() + _FINAL_STATE_S
    states: list[str] = []
    while time.monotonic() < deadline:
        states = _sacct_states(submitted.job_id)
        if states and states[0] not in _STILL_GOING:  # the job's own line first, then its steps'
            break
        time.sleep(1)
    verdicts = [s for s in states if status.lost(s) != status.KILLED]
    if verdicts:
        outcome.status = status.lost(verdicts[0])
        outcome.error = f"SLURM ended a step of job {submitted.job_id} as {verdicts[0]}: {outcome.error}"


def _sacct_states(job_id: str) -> list[str]:
    """The job's state and its steps', as sacct lists them ("CANCELLED by 0" as CANCELLED); none if sacct fails."""
    try:
        listing = subprocess.run(["sacct", "--noheader", "--parsable2", "--format=State", "-j", str(job_id)],
                                 capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(" ")[0].upper() for line in listing.splitlines() if line.strip()]


def run_on_node(job: Job, device: str) -> Outcome:
    """The job body: one cell through the cell process, on the node SLURM chose. A job SLURM is ending (its time
    limit, scancel, a requeue or preemption: SIGTERM, then SIGKILL after KillWait) reports nothing: the scheduler's
    state says how it ended, and a requeued job runs the cell again from its saved state."""
    in_slurm = "SLURM_JOB_ID" in os.environ and threading.current_thread() is threading.main_thread()
    ending = threading.Event()
    before = {}
    if in_slurm:
        before[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: ending.set())
        # submitit asks SLURM for USR2 before the time limit, to requeue checkpointable functions; bench's cells
        # resume from their own saved state, and a job past its limit is the scheduler's TIMEOUT. Ignored, so the
        # cell's process (which inherits it) is not ended by it either.
        before[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        outcome = cellproc.run_cell(job, device, None, lambda event: None, threading.Event())
        if ending.is_set():  # the cell's process died of SLURM's SIGTERM: SLURM's SIGKILL ends this one too
            time.sleep(_ENDING_WAIT_S)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if in_slurm:
        _on_node(outcome, device)
    return outcome


def _on_node(outcome: Outcome, device: str) -> None:
    """The row names the node, and the physical GPU SLURM gave the job (its GRES index); the log names the job."""
    job_id, node = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURMD_NODENAME")
    gpus = os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS") or ""
    known = {"hostname": node} if node else {}
    if job_id:
        known["scheduler_job_id"] = job_id
    if device.startswith("cuda") and gpus.isdigit():
        known["device"] = f"cuda:{gpus}"
    cellproc.correct_provenance(outcome, **known)
    where = f"GPU {gpus}" if device.startswith("cuda") else "its CPUs (no GPU asked for: the partition has none)"
    outcome.log = f"SLURM job {job_id} on node {node}, {where}\n" + (outcome.log or "")


def partition_gres(partition: str) -> tuple[str, list[str]]:
    """The partition's name (the cluster's default for "") and its nodes' generic resources, from sinfo."""
    try:
        listing = subprocess.run(["sinfo", "--noheader", "--format=%P|%G"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"--slurm {partition}: sinfo failed ({exc}); check that this machine reaches the "
                         f"cluster's controller (`sinfo` on its own)") from None
    rows = [line.split("|", 1) for line in listing.splitlines() if "|" in line]
    names = sorted({name.rstrip("*") for name, _ in rows})
    chosen = [(n.rstrip("*"), g) for n, g in rows if (n.rstrip("*") == partition if partition else n.endswith("*"))]
    if not chosen:
        raise BenchError(f"--slurm {partition or '(default)'}: the cluster has no such partition; its partitions are "
                         f"{', '.join(names) or 'none'}")
    gres = [g.strip() for _, field in chosen for g in field.split(",") if g.strip() and g.strip() != "(null)"]
    return chosen[0][0], gres


def _user_parameters() -> dict:
    try:
        return dict(json.loads(os.environ.get("BENCH_SLURM_PARAMETERS") or "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise BenchError(f"BENCH_SLURM_PARAMETERS is not a JSON object ({exc}); write it as "
                         f"'{{\"slurm_account\": \"proj\"}}'") from None


def _submitit():
    try:
        import submitit
    except ImportError:
        raise BenchError("--slurm needs submitit, which is not installed; run `pip install 'bench[slurm]'`") from None
    return submitit
