"""Measurements: synchronised clocks, peak VRAM (allocator, NVML for the device and for one process), peak host
RAM of a process tree, and the environment every row carries. This module measures; it never decides anything."""

from __future__ import annotations

import functools
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def sync(device) -> None:
    """Wait for queued device work, so a clock read afterwards includes it."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between synchronised reads: `lap()` returns the time since the previous lap."""

    def __init__(self, device):
        self.device = device
        sync(device)
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    def total(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.start

    def restart(self) -> None:
        """Count from now: what ran before (building an optimizer, fetching a first batch) is no one's lap."""
        sync(self.device)
        self.start = self.last = time.perf_counter()


def tree_rss_bytes(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (DataLoader workers included)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_pss_bytes(proc: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants: a page shared by n processes counts 1/n
    in each, so pages a forked child shares with its parent (or DataLoader workers with the cell) count once.
    Reads /proc/PID/smaps_rollup, which walks every mapping: about 10 ms of CPU for a process with torch
    loaded, against microseconds for RSS."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakSampler:
    """A background thread that samples a value every `interval_s` and keeps the maximum.

    Sampling can miss a spike shorter than the interval; `ru_maxrss` is recorded beside it as a
    kernel-side cross-check of the worker's own peak.
    """

    def __init__(self, read, interval_s: float = 0.05, on_sample=None):
        self.read, self.interval_s, self.on_sample = read, interval_s, on_sample
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int | None:
        try:
            value = self.read()
        except (psutil.Error, OSError):
            return None
        if value is not None:
            self.peak = max(self.peak, value)
            if self.on_sample is not None:
                self.on_sample(value)
        return value

    def __enter__(self) -> PeakSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def host_maxrss_bytes() -> int:
    """The kernel's peak resident set of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_vram(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def vram_peaks(device) -> dict[str, int | None]:
    """Peak allocated and reserved bytes of the caching allocator since `reset_vram`."""
    import torch

    if device.type != "cuda":
        return {"peak_vram_allocated_bytes": None, "peak_vram_reserved_bytes": None}
    return {
        "peak_vram_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "peak_vram_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def nvml_used_reader(device):
    """A callable reading the whole device's used memory via NVML (all processes), or None without NVML."""
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found

    def read() -> int | None:
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except pynvml.NVMLError:  # a GPU fallen off the bus must not mask the cell's own error
            return None

    return read


def nvml_process_reader(device, pid: int | None = None):
    """A callable reading the GPU memory one process holds (NVML's per-process figure: the CUDA context, the
    allocator's reserve, cuDNN's and cuBLAS's own buffers), or None without NVML. It reads None while NVML does not
    list the process: before its first CUDA call, or where NVML sees another PID namespace (a container)."""
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found
    pid = os.getpid() if pid is None else pid

    def read() -> int | None:
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError:
            return None
        used = [p.usedGpuMemory for p in processes if p.pid == pid and p.usedGpuMemory is not None]
        return int(used[0]) if used else None

    return read


def _nvml_handle(device):
    """(pynvml, the NVML handle of the physical GPU behind a torch CUDA device), or None without NVML."""
    pynvml = _nvml() if device.type == "cuda" else None
    if pynvml is None:
        return None
    try:
        uuid = _cuda_uuid(device)
        if uuid:  # exact, whatever order CUDA enumerates devices in
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid)
        # NVML numbers GPUs by PCI bus; CUDA_VISIBLE_DEVICES (indices or UUIDs) renumbers them for CUDA.
        index = device.index if device.index is not None else 0
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        physical = visible[index] if visible else str(index)
        if physical.isdigit():
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(physical))
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(physical)
    except (pynvml.NVMLError, IndexError):  # no driver, no such device: the NVML columns stay empty
        return None


def _cuda_uuid(device) -> str | None:
    # Only where this process already uses CUDA: the runner must not create a context on the GPUs its
    # workers measure (NVML's device-level peak would include it).
    import torch

    if not torch.cuda.is_initialized():
        return None
    return "GPU-" + str(torch.cuda.get_device_properties(device).uuid)


def _nvml():
    """pynvml, initialised; None where the package or the driver is missing (the NVML columns stay empty)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def nvml_gpu_count() -> int | None:
    """The machine's GPUs as NVML counts them (whatever CUDA_VISIBLE_DEVICES hides), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return None


def _gpu_name(device) -> str | None:
    import torch

    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(device)
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found
    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else name


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit: `BENCH_GIT_COMMIT` where set (the supervisor sets it for each cell, so no cell forks
    a `git` from a process holding torch, which briefly doubled the tree's RSS), else `git rev-parse`; once a process."""
    if given := os.environ.get("BENCH_GIT_COMMIT"):
        return given
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict[str, object]:
    """Provenance columns: which machine and which library versions produced a row. Never initialises
    CUDA itself (the runner calls it too, and must leave the GPUs to its workers)."""
    import torch
    import torchvision

    import bench

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    cuda = device.type == "cuda"
    env = {
        "device": str(device),
        "gpu_name": _gpu_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver_version": _driver_version() if cuda else None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "timm_version": timm_version,
        "python_version": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "hostname": socket.gethostname(),
        "bench_version": bench.__version__,
        "git_commit": git_commit(),
    }
    return env


def _driver_version() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except nvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else version
