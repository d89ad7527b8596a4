"""The Ray executor: the suite's cells as Ray tasks on a cluster's GPUs, each still in its own process.

The driver (`bench run --ray ADDRESS`) keeps what makes a run safe: the results folder, its lock, resume
and every write. A task runs one cell on a node exactly as the local executor does (`runner.run_one`: a
fresh worker process, the same limits, the same rows) and sends back the row, the epochs and the log.
Datasets must be at the same `--data-root` path on every node (a shared file system, or fetched there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.errors import BenchError
from bench.suite import Cell, Suite


def execute(cells: list[Cell], suite: Suite, run_id: str, options, store, record: Callable,
            failed_row: Callable[[Cell, str, str], dict]) -> None:
    """Run `cells` as Ray tasks, one GPU each (or one whole node each on a CPU-only cluster), recording
    each row on the driver as its task ends."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        # BENCH_* settings (data root, resident limit) reach the nodes' workers as they reach local ones.
        env = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
        ray.init(address=None if options.ray == "local" else options.ray, runtime_env={"env_vars": env},
                 include_dashboard=False, log_to_driver=False)
    try:
        device, resources = _placement(ray)
        task = ray.remote(max_retries=0, **resources)(run_on_node)  # a retry would be a silent second run
        pending = {task.remote(cell, suite, run_id, device, options): cell for cell in cells}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                try:
                    row, epochs, log = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the node or its Ray worker died under the cell
                    row, epochs, log = failed_row(cell, "killed", _first_line(exc)), [], str(exc)
                store.log_path(suite.name, cell.id, run_id).write_text(log)
                record(row, epochs)
        except KeyboardInterrupt:
            for ref in pending:  # kills each task's Ray worker; the cell's own worker dies with it (PDEATHSIG)
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def run_on_node(cell: Cell, suite: Suite, run_id: str, device: str, options) -> tuple[dict, list[dict], str]:
    """The task body: one cell through the local executor's own path, on whichever node Ray chose."""
    from bench.runner import run_one

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        log = Path(tmp) / "cell.log"
        row, epochs = run_one(cell, suite, run_id, device, options, log, lambda event: None)
        return row, epochs, log.read_text(errors="replace") if log.is_file() else ""


def _placement(ray) -> tuple[str, dict]:
    # Ray hands a task with num_gpus=1 one GPU through CUDA_VISIBLE_DEVICES: inside it that GPU is cuda:0.
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return "cuda:0", {"num_gpus": 1, "num_cpus": 1}
    # Without GPUs a cell takes a whole node, as it has the whole machine locally: timings stay its own.
    cpus = min(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"])
    return "cpu", {"num_cpus": cpus}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"the Ray task ended without a result: {text.splitlines()[0] if text else type(exc).__name__}"


def _ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--ray needs Ray, which is not installed; run `pip install 'bench[ray]'`") from None
    return ray
