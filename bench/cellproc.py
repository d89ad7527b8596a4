"""One cell in its own process: start it (forked from the fork server, or a fresh interpreter), hold it to its time
and host-memory limits, sample its process tree's memory, relay its progress, and turn however it ended into an
`Outcome`. Every executor runs cells through `run_cell`; it does not know which one called it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import psutil

from bench import measure, status
from bench.forkserver import FORKSERVER, SUBPROCESS, Forked, ForkServer
from bench.result import Part, Process, Provenance, parts_from_values
from bench.suite import Cell

Report = Callable[[dict], None]
SAVED_FILES = ("model.safetensors", "model.json")  # what a worker leaves with `save_model` (bench/saved.py)


@dataclass(frozen=True)
class Job:
    """A cell and what its process needs besides: where the data is, and the limits it runs under."""

    cell: Cell
    data_root: str | None = None
    download: bool = True
    stored_resolution: int | None = None  # the side an image folder is decoded to, chosen for the whole suite
    timeout_s: float | None = None
    max_host_bytes: int | None = None  # on the process tree's PSS
    state_dir: str | None = None  # the cell's saved state (results/SUITE/state/CELL_ID): resumed from, saved to
    pause_at: int | None = None  # a race's rung: stop with the state saved after this many epochs
    checkpoint_forced: bool = False  # save after every epoch whatever the cell's `checkpoint` says (a race)

    def spec(self, device: str) -> dict:
        """What the worker reads from its SPEC file."""
        return {"cell": self.cell.model_dump_json(), "device": worker_device(device), "data_root": self.data_root,
                "download": self.download, "stored_resolution": self.stored_resolution, "state_dir": self.state_dir,
                "pause_at": self.pause_at, "checkpoint_forced": self.checkpoint_forced}


@dataclass
class Outcome:
    """How one cell ended: its status and error, the parts of the result it measured (bench/result.py; provenance
    always), its epoch table and its stderr. Executors return these; only the runner turns them into rows and files."""

    status: str
    error: str | None = None
    parts: dict[str, Part] = field(default_factory=dict)
    epochs: list[dict] = field(default_factory=list)
    log: str | None = None  # None: no process of ours ran the cell
    files: dict[str, bytes] = field(default_factory=dict)  # the trained model, with `save_model` (bench/saved.py)


def run_cell(job: Job, device: str, server: ForkServer | None, report: Report, stop: threading.Event) -> Outcome:
    """Run one cell in a process of its own (forked from `server` where it can, else fresh) and return how it
    ended, whatever happened to it. Setting `stop` kills it; its outcome is then `status.INTERRUPTED`, as it is
    when the fork server dies under it."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
        spec, result, log = Path(tmp) / "spec.json", Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        spec.write_text(json.dumps({**job.spec(device), "model_dir": tmp}))
        with open(log, "w") as err:
            launched = time.clock_gettime(time.CLOCK_MONOTONIC)
            child, method = _start(server, spec, result, child_env(device), err)
            ending, memory, ready = _supervise(child, job, report, stop)
        reported = json.loads(result.read_text()) if result.is_file() else None
        log_text = log.read_text(errors="replace")
        kept = {name: (Path(tmp) / name).read_bytes() for name in SAVED_FILES if (Path(tmp) / name).is_file()}
    outcome = _outcome(reported, ending, device, log_text)
    if outcome.status == status.OK:
        outcome.files = kept
    # A resumed cell's wall time adds its earlier segments' (up to their last save); peaks are this segment's.
    prior_s = float((reported or {}).get("prior_wall_s") or 0.0) if ending.trusts_report() else 0.0
    outcome.parts["process"] = Process(
        wall_s=time.perf_counter() - t0 + prior_s, peak_host_rss_bytes=memory.rss_peak or None,
        peak_host_pss_bytes=memory.pss_peak or None, start_method=method,
        start_s=ready - launched if ready is not None else None, started_at=started,
        finished_at=datetime.now(timezone.utc))
    return outcome


def correct_provenance(outcome: Outcome, **known) -> None:
    """Replace columns of the outcome's provenance with what an executor knows better (which device and host)."""
    outcome.parts["provenance"] = dataclasses.replace(outcome.parts.get("provenance", Provenance()), **known)


def without_process(device: str, status_: str, error: str) -> Outcome:
    """The outcome of a cell that no process of ours saw end (its data missing, its node lost): what the driver
    knows, with the driver's provenance for `device`."""
    now = datetime.now(timezone.utc)
    return Outcome(status_, error, {"provenance": device_env(device), "process": Process(started_at=now, finished_at=now)})


def _start(server: ForkServer | None, spec: Path, result: Path, env: dict[str, str], log: IO) -> tuple:
    """The worker's process and how it was started: forked from the server, or (no server, or one that cannot
    give this cell its environment) a fresh `python -m bench.worker` in its own session."""
    argv = ["bench.worker", str(spec), str(result)]
    child = server.start("bench.worker:main", [argv], env, log.fileno()) if server is not None else None
    if child is not None:
        return child, FORKSERVER
    # Its own session: a kill takes its DataLoader workers too.
    return subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            start_new_session=True), SUBPROCESS


def _outcome(reported: dict | None, ending: status.Ending, device: str, log_text: str) -> Outcome:
    if reported is None or not ending.trusts_report():
        return Outcome(ending.status(), ending.error(log_text), {"provenance": device_env(device)}, [], log_text)
    parts = parts_from_values(reported.get("parts", {}))
    if "provenance" not in parts:  # the worker failed before it looked: the supervisor's view of the machine
        parts["provenance"] = device_env(device)
    elif device.startswith("cuda"):
        # The worker sees one GPU as cuda:0 (CUDA_VISIBLE_DEVICES); which one, and how many the machine has, only
        # its supervisor knows. (A CPU worker sees what its supervisor sees, which spares the supervisor torch.)
        machine = device_env(device)
        parts["provenance"] = dataclasses.replace(parts["provenance"], device=machine.device, gpu_count=machine.gpu_count)
    return Outcome(reported["status"], reported.get("error"), parts, reported.get("epochs", []), log_text)


def _supervise(child, job: Job, report: Report, stop: threading.Event) -> tuple[status.Ending, _HostMemory, float | None]:
    """Watch the worker until it ends: enforce the limits, sample its memory, relay its progress."""
    ending = status.Ending(limit_bytes=job.max_host_bytes, timeout_s=job.timeout_s)

    def stop_for(reason: str) -> None:
        if ending.stopped_for is None or reason == status.INTERRUPTED:
            ending.stopped_for = reason
        _kill_group(child.pid)

    memory = _HostMemory(child.pid, job.max_host_bytes, on_over=lambda: stop_for(status.OOM))
    relay = _Relay(child.stdout, report)
    with memory.sampler():
        relay.start()
        deadline = time.monotonic() + job.timeout_s if job.timeout_s else None
        while child.poll() is None:
            if stop.is_set():  # Ctrl-C or a failure elsewhere: this cell gets no row and runs again next time
                stop_for(status.INTERRUPTED)
            elif deadline is not None and time.monotonic() > deadline:
                stop_for(status.TIMEOUT)
            try:
                child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
        if isinstance(child, Forked) and child.server_lost:
            # The harness failed, not the cell: no row, it runs again. The server's death killed the cell's process
            # only (PDEATHSIG); its DataLoader workers go with its session.
            stop_for(status.INTERRUPTED)
        relay.join(timeout=5)
    if not relay.is_alive():  # else a DataLoader worker that outlived the kill still holds the pipe: leave it be
        child.stdout.close()
    ending.returncode = child.returncode
    return ending, memory, relay.ready


class _HostMemory:
    """Peaks of the cell's process tree: RSS every 50 ms; PSS when RSS passes its highest value by 1 % and
    otherwise every 0.5 s. A PSS read walks every mapping, about 10 ms of CPU per process with torch loaded, so
    at 50 ms it would take a fifth of a core from the cell it measures. The host-memory limit acts on PSS, and as
    PSS never exceeds RSS, only an RSS past the limit needs a PSS read to decide."""

    PSS_EVERY_S = 0.5

    def __init__(self, pid: int, limit: int | None, on_over: Callable[[], None]):
        try:
            self.proc: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:  # it ended (and was reaped by the fork server) before we looked
            self.proc = None
        self.limit, self.on_over = limit, on_over
        self.rss_peak = self.pss_peak = 0
        self._rss_high, self._pss_at = 0, float("-inf")

    def sampler(self) -> measure.PeakSampler:
        return measure.PeakSampler(self._rss, on_sample=self._on_rss)

    def _rss(self) -> int | None:
        if self.proc is None:
            return None
        self.rss_peak = max(self.rss_peak, rss := measure.tree_rss_bytes(self.proc))
        return rss

    def _on_rss(self, rss: int) -> None:
        over = self.limit is not None and rss > self.limit
        due = rss > self._rss_high * 1.01 or time.monotonic() - self._pss_at >= self.PSS_EVERY_S
        if not (over or due):
            return
        self._rss_high, self._pss_at = max(self._rss_high, rss), time.monotonic()
        try:
            pss = measure.tree_pss_bytes(self.proc)
        except (psutil.Error, OSError):
            return
        self.pss_peak = max(self.pss_peak, pss)
        if over and pss > self.limit:
            self.on_over()


class _Relay(threading.Thread):
    """Pass the worker's progress events (JSON lines on its stdout) on; keep the clock of its "ready" event."""

    def __init__(self, stream, report: Report):
        super().__init__(daemon=True)
        self.stream, self.report = stream, report
        self.ready: float | None = None

    def run(self) -> None:
        for line in self.stream:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing to stdout: not a progress event
            if not isinstance(event, dict):
                continue
            if event.get("kind") == "ready":
                self.ready = event.get("clock")
                continue
            try:
                self.report(event)
            except Exception:  # noqa: BLE001 - a display problem must never stop the pipe draining
                continue


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # a forked child may not have its own group yet: then it has no workers either
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_device(device: str) -> str:
    # Each GPU worker sees one device through CUDA_VISIBLE_DEVICES, so inside it is always cuda:0.
    return "cuda:0" if device.startswith("cuda") else device


def child_env(device: str) -> dict[str, str]:
    """The environment of a cell's process on `device`."""
    env = dict(os.environ)
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    env.setdefault("PYTHONUNBUFFERED", "1")
    if commit := measure.git_commit():  # asked once here, not in every cell's process
        env.setdefault("BENCH_GIT_COMMIT", commit)
    if device == "cpu":
        # OpenMP threads spin while they wait; with any other busy process on a small machine a spinning
        # thread steals the core its partner needs, and a step ran 25-50x slower here. Passive waiting
        # costs little when the machine is idle. OpenMP reads it when it loads: the fork server gets it too.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


_ENV_CACHE: dict[str, dict] = {}


def device_env(device: str) -> Provenance:
    """Provenance for rows whose worker died before reporting its own (a new part each call)."""
    # Keyed on the GPUs this process sees too: a Ray worker process runs tasks given different GPUs.
    key = f"{device}|{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    if key not in _ENV_CACHE:
        import torch

        _ENV_CACHE[key] = measure.environment(torch.device(device))
    return Provenance(**_ENV_CACHE[key])
