"""The Ray executor: the suite's cells as Ray tasks on a cluster's GPUs, each still in its own process.

The driver (`bench run --ray ADDRESS`) keeps what makes a run safe: the results folder, its lock, resume
and every write. A task runs one cell on a node exactly as the local executor does (`runner.run_one`: a
fresh worker process, the same limits, the same rows) and sends back the row, the epochs and the log.
Datasets must be at the same `--data-root` path on every node (a shared file system): the driver prepares
them once, up front, and the nodes never download.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError
from bench.suite import Cell, Suite


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
        raise BenchError(f"--ray {address}: cannot connect to a Ray cluster ({first}); start one with `ray start "
                         f"--head`, pass its address (auto, ray://HOST:10001), or use --ray local") from None
    try:
        yield
    finally:
        ray.shutdown()


def execute(cells: list[Cell], suite: Suite, run_id: str, options, store, record: Callable,
            failed_row: Callable[[Cell, str, str], dict]) -> None:
    """Run `cells` as Ray tasks, one GPU each (or a node's worth of CPUs on a CPU-only cluster), recording
    each row on the driver as its task ends. Needs an open `session`."""
    ray = _ray()
    device, resources = _placement(ray)
    task = ray.remote(max_retries=0, **resources)(run_on_node)  # a retry would be a silent second run
    node_options = dataclasses.replace(options, download=False)  # the driver fetched what could be fetched
    pending = {task.remote(cell, suite, run_id, device, node_options): cell for cell in cells}
    lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OwnerDiedError)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                row, epochs, log = ray.get(done[0])
            except lost as exc:  # the node or its Ray worker died under the cell: that cell's row says so
                row, epochs, log = failed_row(cell, "killed", _first_line(exc)), [], str(exc)
                row.update(device=device, hostname=None, gpu_name=None)  # not the driver's
            except ray.exceptions.RayTaskError as exc:  # bench itself failed on the node: every cell would
                raise BenchError(f"a Ray task failed on its node ({_first_line(exc)}); check that bench and its "
                                 f"dependencies are installed there, in the driver's version") from None
            row.update(cell_id=cell.id, group_id=cell.group_id)  # the driver's ids, whatever the node's version
            store.log_path(suite.name, cell.id, run_id).write_text(log)
            record(row, epochs)
    except BaseException:  # Ctrl-C or a failed node: kill each task's Ray worker; its cell process dies with it
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def run_on_node(cell: Cell, suite: Suite, run_id: str, device: str, options) -> tuple[dict, list[dict], str]:
    """The task body: one cell through the local executor's own path, on whichever node Ray chose."""
    from bench import measure
    from bench.runner import run_one

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        log = Path(tmp) / "cell.log"
        row, epochs = run_one(cell, suite, run_id, device, options, log, lambda event: None)
        log_text = log.read_text(errors="replace") if log.is_file() else ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device.startswith("cuda") and visible.isdigit():  # the physical GPU Ray gave this task
        row.update(device=f"cuda:{visible}", gpu_count=measure.nvml_gpu_count() or row.get("gpu_count"))
    return row, epochs, log_text


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


def _ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--ray needs Ray, which is not installed; run `pip install 'bench[ray]'`") from None
    return ray
