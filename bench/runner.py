"""Ordering and resuming cells, one process per cell, time and memory limits, and turning every
way a cell can end (crash, OOM, kill, timeout) into a result row. Executors: local (one cell per
device at a time, here) and Ray (`bench/cluster.py`: the same cell processes on a cluster's GPUs)."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from bench import measure
from bench.store import ResultStore
from bench.suite import Cell, Suite


@dataclass(frozen=True)
class RunOptions:
    """How to run a suite; none of this changes what a cell is."""

    results: Path = Path("results")
    data_root: Path | None = None
    devices: tuple[str, ...] = ("cpu",)
    rerun: bool = False
    only: str | None = None
    max_cells: int | None = None
    cell_timeout_s: float | None = None
    max_host_bytes: int | None = None
    download: bool = True
    ray: str | None = None  # a Ray address ("auto", "ray://host:10001") or "local": run cells as Ray tasks
    # dataset -> the side its image-folder images are stored at; run_suite fills it from the whole suite
    stored_resolutions: dict[str, int] = field(default_factory=dict)


@dataclass
class RunSummary:
    run_id: str
    rows: list[dict] = field(default_factory=list)
    skipped: int = 0


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def matches(cell: Cell, pattern: str) -> bool:
    """`--only`: a glob on the cell id or model name, or `field=value` (e.g. resolution=32)."""
    if "=" in pattern:
        key, _, value = pattern.partition("=")
        return str(getattr(cell, key.strip(), None)) == value.strip()
    bare = cell.model.split(":", 1)[-1]
    return any(fnmatch.fnmatchcase(s, pattern) for s in (cell.id, cell.model, bare))


def select(cells: list[Cell], done: set[str], options: RunOptions) -> tuple[list[Cell], int]:
    """Cells still to run, in suite order; returns them and how many were skipped as already done."""
    chosen = [c for c in cells if options.only is None or matches(c, options.only)]
    todo = chosen if options.rerun else [c for c in chosen if c.id not in done]
    if options.max_cells is not None:
        todo = todo[: options.max_cells]
    return todo, len(chosen) - len([c for c in chosen if c.id not in done or options.rerun])


def run_suite(suite: Suite, cells: list[Cell], options: RunOptions, report: Callable[[dict], None] = lambda e: None) -> RunSummary:
    """Run the cells that have no row yet; each finished cell is on disk before the next starts."""
    store = ResultStore(options.results)
    summary = RunSummary(run_id=new_run_id())
    lock = threading.Lock()

    def record(row: dict, epochs: list[dict]) -> None:
        store.write(row, epochs)
        with lock:
            summary.rows.append(row)
        report({"kind": "cell_done", "row": row})

    with _executor_session(options), store.lock():
        todo, summary.skipped = select(cells, store.done_cell_ids(suite.name), options)
        report({"kind": "suite", "total": len(todo), "skipped": summary.skipped})
        options = dataclasses.replace(options, stored_resolutions=stored_resolutions(cells))
        missing = _missing_datasets(todo, options)
        runnable = []
        for cell in todo:
            if cell.dataset in missing:  # one clear row per cell, no process started for nothing
                record(_failed_row(cell, suite, summary.run_id, options, missing[cell.dataset]), [])
            else:
                runnable.append(cell)
        if options.ray:
            from bench import cluster

            cluster.execute(runnable, suite, summary.run_id, options, store, record,
                            lambda cell, status, error: _failed_row(cell, suite, summary.run_id, options, (status, error)))
        else:
            _execute(runnable, suite, summary.run_id, options, store, report, record)
    return summary


def _executor_session(options: RunOptions):
    """Ray's connection, opened before the results folder is locked so a bad address changes nothing."""
    if not options.ray:
        return contextlib.nullcontext()
    from bench import cluster

    return cluster.session(options.ray)


def _execute(cells: list[Cell], suite, run_id, options, store, report, record) -> None:
    """The local executor: one thread per device, a cell per device at a time. On Ctrl-C every worker is
    killed and every thread joined before the results folder is unlocked, so no cell runs on behind a
    later run's back."""
    stop, errors = threading.Event(), []
    jobs: queue.Queue[Cell] = queue.Queue()
    for cell in cells:
        jobs.put(cell)

    def drain(device: str) -> None:
        while not stop.is_set():
            try:
                cell = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                log = store.log_path(suite.name, cell.id, run_id)
                row, epochs = run_one(cell, suite, run_id, device, options, log, report, stop)
                if row["status"] != "interrupted":
                    record(row, epochs)
            except Exception as exc:  # noqa: BLE001 - re-raised in the main thread after the others stop
                errors.append(exc)
                stop.set()

    threads = [threading.Thread(target=drain, args=(d,), daemon=True) for d in options.devices]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def _failed_row(cell: Cell, suite: Suite, run_id: str, options: RunOptions, reason: tuple[str, str]) -> dict:
    """The row of a cell that ended without a worker's report: (status, error) say why."""
    now = datetime.now(timezone.utc)
    row = base_row(cell, suite, run_id)
    row.update(_device_env(options.devices[0]), status=reason[0], error=reason[1], started_at=now, finished_at=now)
    return row


def stored_resolutions(cells: list[Cell]) -> dict[str, int]:
    """The side each dataset's image-folder images are decoded to, from the whole suite (not just the cells
    this run selects, so a resumed or narrowed run stores the same pixels): the explicit `source_resolution`
    where cells give one, else the largest resolution any cell asks for. `bench.data` caps it by the images'
    own size."""
    out: dict[str, int] = {}
    for dataset in dict.fromkeys(c.dataset for c in cells):
        mine = [c for c in cells if c.dataset == dataset]
        explicit = [c.source_resolution for c in mine if c.source_resolution]
        out[dataset] = max(explicit) if explicit else max(c.resolution for c in mine)
    return out


def _missing_datasets(cells: list[Cell], options: RunOptions) -> dict[str, str]:
    """Fetch or decode each dataset once, up front; map the ones that cannot be had to the reason."""
    from bench import data
    from bench.errors import UnavailableError

    missing: dict[str, tuple[str, str]] = {}
    for dataset in dict.fromkeys(c.dataset for c in cells):
        try:
            data.prepare(dataset, options.data_root, download=options.download, stored_resolution=options.stored_resolutions.get(dataset))
        except UnavailableError as exc:
            missing[dataset] = ("unavailable", f"{exc.__class__.__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a corrupt file: every cell of it gets an error row naming it
            missing[dataset] = ("error", f"{exc.__class__.__name__} preparing {dataset}: {exc}"[:2000])
    return missing


def base_row(cell: Cell, suite: Suite, run_id: str) -> dict:
    row = cell.model_dump(exclude={"freeze"})
    row.update(freeze=cell.freeze_label, cell_json=cell.canonical(), run_id=run_id, suite=suite.name,
               suite_hash=suite.hash, cell_id=cell.id, group_id=cell.group_id)
    return row


@dataclass
class _Watch:
    """What the runner saw of a worker: its memory peak and why (if at all) it was stopped."""

    peak: int = 0
    stopped_for: str | None = None
    returncode: int | None = None
    limit: int | None = None
    timeout: float | None = None


def run_one(cell: Cell, suite: Suite, run_id: str, device: str, options: RunOptions, log: Path,
            report: Callable[[dict], None], stop: threading.Event | None = None) -> tuple[dict, list[dict]]:
    """Run one cell in a fresh process (its stderr to `log`) and return its row, whatever happened to it."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"cell": cell.model_dump_json(), "device": _worker_device(device),
                                    "data_root": str(options.data_root) if options.data_root else None,
                                    "download": options.download,
                                    "stored_resolution": options.stored_resolutions.get(cell.dataset)}))
        with open(log, "w") as err:
            argv = [sys.executable, "-m", "bench.worker", str(spec), str(result)]
            watch = _supervise(cell, argv, device, options, err, report, stop or threading.Event())
        outcome = json.loads(result.read_text()) if result.is_file() else None
    row = base_row(cell, suite, run_id)
    machine = _device_env(device)
    row.update(machine)
    epochs: list[dict] = []
    # A result written before the process died (a crash at interpreter teardown) still counts, unless
    # the runner itself stopped the cell for memory or time.
    if outcome is not None and watch.stopped_for not in ("oom", "timeout", "interrupted"):
        row.update(outcome.get("row", {}))
        row.update(status=outcome["status"], error=outcome.get("error"))
        epochs = outcome.get("epochs", [])
        # The worker sees one GPU as cuda:0 (CUDA_VISIBLE_DEVICES); which one, and how many the machine
        # has, only the runner knows.
        row.update(device=machine["device"], gpu_count=machine["gpu_count"])
    else:
        code = watch.returncode
        status = watch.stopped_for or ("killed" if code is not None and code < 0 else "error")
        row.update(status=status, error=_last_line(log, watch))
    row.update(wall_s=time.perf_counter() - t0, peak_host_rss_bytes=watch.peak or None,
               started_at=started, finished_at=datetime.now(timezone.utc))
    return row, epochs


def _worker_device(device: str) -> str:
    # Each GPU worker sees one device through CUDA_VISIBLE_DEVICES, so inside it is always cuda:0.
    return "cuda:0" if device.startswith("cuda") else device


def _child_env(device: str) -> dict:
    env = dict(os.environ)
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        # OpenMP threads spin while they wait; with any other busy process on a small machine a spinning
        # thread steals the core its partner needs, and a step ran 25-50x slower here. Passive waiting
        # costs little when the machine is idle.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _supervise(cell, argv, device, options, err, report, stop: threading.Event) -> _Watch:
    """Start the worker, sample its process tree's RSS, enforce the limits, relay its progress."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=_child_env(device),
                            start_new_session=True)  # its own process group: a kill takes its workers too
    limit = options.max_host_bytes
    timeout = cell.cell_timeout_s or options.cell_timeout_s
    watch = _Watch(limit=limit, timeout=timeout)

    def on_sample(rss: int) -> None:
        if limit and rss > limit and watch.stopped_for is None:
            watch.stopped_for = "oom"
            _kill_group(proc)

    sampler = measure.PeakSampler(lambda: measure.tree_rss_bytes(psutil.Process(proc.pid)), on_sample=on_sample)
    relay = threading.Thread(target=_relay, args=(proc, report), daemon=True)
    with sampler:
        relay.start()
        deadline = time.monotonic() + timeout if timeout else None
        while proc.poll() is None:
            if stop.is_set():  # Ctrl-C or a failure elsewhere: this cell gets no row and runs again next time
                watch.stopped_for = "interrupted"
                _kill_group(proc)
            elif deadline is not None and time.monotonic() > deadline:
                watch.stopped_for = watch.stopped_for or "timeout"
                _kill_group(proc)
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
        relay.join(timeout=5)
    watch.peak = sampler.peak
    if proc.returncode and proc.returncode < 0 and watch.stopped_for is None:
        watch.stopped_for = "killed"
    watch.returncode = proc.returncode
    return watch


def _relay(proc: subprocess.Popen, report: Callable[[dict], None]) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library printing to stdout: not a progress event
        if isinstance(event, dict):
            try:
                report(event)
            except Exception:  # noqa: BLE001 - a display problem must never stop the pipe draining
                continue


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(log: Path, watch: _Watch) -> str:
    """The error message for a worker that did not report: why it was stopped, and its last words."""
    code = watch.returncode
    if watch.stopped_for == "oom":
        reason = f"host RAM of the cell's processes passed the limit of {(watch.limit or 0) / 2**30:.2f} GiB"
    elif watch.stopped_for == "timeout":
        reason = f"the cell ran past its time limit of {watch.timeout:g} s"
    elif code is not None and code < 0:
        reason = f"the worker was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            reason += " (often the kernel's out-of-memory killer)"
    else:
        reason = f"the worker exited with code {code} without a result"
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return reason + (f"; last output: {tail[-1][:300]}" if tail else "")


_ENV_CACHE: dict[str, dict] = {}


def _device_env(device: str) -> dict:
    """Provenance for rows whose worker died before reporting its own."""
    # Keyed on the GPUs this process sees too: a Ray worker process runs tasks given different GPUs.
    key = f"{device}|{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    if key not in _ENV_CACHE:
        import torch

        _ENV_CACHE[key] = measure.environment(torch.device(device))
    return dict(_ENV_CACHE[key])
