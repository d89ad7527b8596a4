"""The Ray executor: the suite's cells as Ray tasks on a cluster's GPUs, each still in its own process.

The driver (`bench run --ray ADDRESS`) keeps what makes a run safe: the results folder, its lock, resume and every
write. A task runs one cell on a node through the same cell process as a local run (`cellproc.run_cell`, the same
limits and statuses; a fresh interpreter, not the fork server, as a Ray worker runs tasks for whoever asks) and
sends the outcome back with the log. Datasets must be at the same `--data-root` path on every node (a shared file
system): the driver prepares them once, up front, and the nodes never download.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import bench
from bench import cellproc, measure, status
from bench.cellproc import Job, Outcome, Report
from bench.errors import BenchError
from bench.suite import Cell

PROBE_S = 120.0  # how long the driver waits for every node to say which bench it has (a busy node's workers start)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str):
        self.address = address
        self._session = session(address)

    def __enter__(self) -> RayExecutor:
        self._session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._session.__exit__(*exc)

    def run(self, jobs: Sequence[Job], report: Report) -> Iterator[tuple[Cell, Outcome]]:
        """Each cell as a Ray task holding one GPU (or a node's worth of CPUs on a CPU-only cluster), its outcome
        yielded as the task ends. Closing early cancels every task still pending (force: its Ray worker is killed,
        and its cell process dies with it)."""
        ray = _ray()
        with _system_failures(ray):
            check_nodes(ray)
            device, resources = _placement(ray)
        task = ray.remote(max_retries=0, **resources)(run_on_node)  # a retry would be a silent second run
        # The driver fetched what could be fetched: a node never downloads.
        pending = {task.remote(dataclasses.replace(job, download=False), device): job.cell for job in jobs}
        try:
            while pending:
                with _system_failures(ray):
                    done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                outcome = _fetch(ray, done[0], cell, device)
                if outcome is not None:
                    yield cell, outcome
        finally:
            for ref in pending:
                with suppress(ray.exceptions.RayError):  # a cluster already gone has nothing left to cancel
                    ray.cancel(ref, force=True)


def _fetch(ray, ref, cell: Cell, device: str) -> Outcome | None:
    """The outcome a task sent back, or the one `failed_task` gives it; None (and one warning line) where Ray lost
    it after the task ran: the harness failed, not the cell, which gets no row and runs again next time."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # bench itself failed on the node: every cell would
        raise BenchError(f"a Ray task failed on its node ({_first_line(exc)}); check that bench and its "
                         f"dependencies are installed there, in the driver's version") from None
    except ray.exceptions.RayError as exc:  # Ray ended the task, or lost its result
        outcome = failed_task(ray, exc, device)
        if outcome is None:
            print(f"warning: Ray lost the outcome of cell {cell.id} after its task ran ({_said(exc)}); it gets no "
                  f"row and runs again with the next `bench run`", file=sys.stderr, flush=True)
        return outcome


def failed_task(ray, exc: BaseException, device: str) -> Outcome | None:
    """The outcome of a cell whose task Ray ended, as on one machine: its memory monitor's kill is `oom`; a task
    that can never be placed or whose runtime environment cannot be set up is `error`; a lost node or Ray worker
    is `killed`. None where Ray lost the task's result after it ran (`ObjectLostError`: its node died, its object
    was freed): the cell gets no row and runs again next time. Anything else Ray raises is about Ray, not the
    cell: it stops the run with one line (`BenchError`)."""
    errors = ray.exceptions
    if isinstance(exc, errors.OutOfMemoryError):
        ended = status.OOM
    elif isinstance(exc, (errors.TaskUnschedulableError, errors.RuntimeEnvSetupError)):
        ended = status.ERROR
    elif isinstance(exc, (errors.WorkerCrashedError, errors.NodeDiedError, errors.OwnerDiedError)):
        ended = status.lost()
    elif isinstance(exc, errors.ObjectLostError):
        return None
    else:
        raise BenchError(_system_failure(exc)) from None
    outcome = cellproc.without_process("cpu", ended, _first_line(exc))
    cellproc.correct_provenance(outcome, device=device, hostname=None, gpu_name=None)  # not the driver's
    outcome.log = str(exc)
    return outcome


def run_on_node(job: Job, device: str) -> Outcome:
    """The task body: one cell through the cell process, on whichever node Ray chose."""
    outcome = cellproc.run_cell(job, device, None, lambda event: None, threading.Event())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device.startswith("cuda") and visible.isdigit():  # the physical GPU Ray gave this task
        known = outcome.parts["provenance"].gpu_count
        cellproc.correct_provenance(outcome, device=f"cuda:{visible}", gpu_count=measure.nvml_gpu_count() or known)
    # The Ray node, not only the machine: several nodes may share one host (and its hostname).
    node = _ray().get_runtime_context().get_node_id()
    host = outcome.parts["provenance"].hostname or socket.gethostname()
    cellproc.correct_provenance(outcome, hostname=f"{host} (ray node {node[:8]})")
    outcome.log = f"Ray node {node} on {host}\n" + (outcome.log or "")
    return outcome


def check_nodes(ray) -> None:
    """Every live node imports bench in the driver's version, asked before any cell runs: one error line naming
    the nodes that differ, not a failed row per cell."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def version() -> str:  # nested, so Ray sends it by value: it must run where bench is missing too
        import importlib

        try:
            return importlib.import_module("bench").__version__
        except ImportError as exc:
            return f"no bench ({exc})"

    probe = ray.remote(num_cpus=0, max_retries=0)(version)
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    asked = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(): node_id
             for node_id in nodes}
    ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=PROBE_S)
    found = {asked[ref]: _answer(ray, ref) for ref in ready}
    found.update({asked[ref]: f"no answer in {PROBE_S:g} s" for ref in late})
    wrong = {node_id: said for node_id, said in found.items() if said != bench.__version__}
    if wrong:
        named = "; ".join(f"node {node_id[:8]} ({nodes[node_id]['NodeManagerAddress']}): {said}"
                          for node_id, said in sorted(wrong.items()))
        raise BenchError(f"{len(wrong)} of the cluster's {len(nodes)} nodes cannot run bench {bench.__version__} "
                         f"(the driver's): {named}; install the driver's bench on every node")


@contextmanager
def session(address: str) -> Iterator[None]:
    """Connected to the cluster at `address` ("local" starts a fresh instance here) for the duration."""
    ray = _ray()
    if ray.is_initialized():  # a caller's own session (a notebook, a test): use it, leave it running
        yield
        return
    # BENCH_* settings (resident-loader limit, test hooks) reach the nodes' workers as they reach local ones.
    env = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError(f"--ray {address}: cannot connect to a Ray cluster ({first}); {_connect_hint(exc)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _answer(ray, ref) -> str:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the node cannot run even the probe (another Python, another Ray)
        return f"the probe failed ({_said(exc)})"


def _connect_hint(exc: BaseException) -> str:
    """What to do: a cluster that asks for a token (`ray start` turns token authentication on by default) needs
    the driver to read it, which it does only with RAY_AUTH_MODE=token."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any("AuthenticationError" in type(e).__name__ or "InvalidAuthToken" in str(e) for e in chain):
        return ("the cluster asks for an authentication token: set RAY_AUTH_MODE=token where bench runs (the token "
                "is read from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
    return "start one with `ray start --head`, pass its address (auto, ray://HOST:10001), or use --ray local"


def _placement(ray) -> tuple[str, dict]:
    # Ray hands a task with num_gpus=1 one GPU through CUDA_VISIBLE_DEVICES: inside it that GPU is cuda:0.
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return "cuda:0", {"num_gpus": 1, "num_cpus": 1}
    # Without GPUs a cell takes as many CPUs as the smallest worker node has, so it has a node to itself as
    # it has the machine locally (on nodes of mixed sizes a big node may run two cells at once).
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return "cpu", {"num_cpus": min(c for c in cpus if c > 0) if any(cpus) else 1}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"the Ray task ended without a result: {text.splitlines()[0] if text else type(exc).__name__}"


def _said(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _system_failure(exc: BaseException) -> str:
    return (f"Ray failed, not a cell ({_said(exc)}); the cells still running were cancelled, and those without a "
            f"row run again with the next `bench run`; check the cluster with `ray status`")


@contextmanager
def _system_failures(ray) -> Iterator[None]:
    """Ray itself failing while the driver asks it something (its raylet or GCS gone): one line, no traceback."""
    try:
        yield
    except ray.exceptions.RayError as exc:
        raise BenchError(_system_failure(exc)) from None


def _ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--ray needs Ray, which is not installed; run `pip install 'bench[ray]'`") from None
    return ray
