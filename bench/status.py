"""Every way a cell can end, mapped to a row's `status` and `error`, in one place.

Three vantage points see a cell end, and each has its mapping here: the worker sees an exception
(`classify`, `message`); the cell's supervisor sees a process stop, by itself or because it was stopped
(`Ending`); an executor sees a cell lost with its node, Ray worker or scheduler job (`lost`).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from bench.errors import UnavailableError

OK, OOM, KILLED, TIMEOUT, ERROR, UNAVAILABLE = "ok", "oom", "killed", "timeout", "error", "unavailable"
# Not a row: a cell stopped because the run itself stopped (Ctrl-C, a failure elsewhere). It runs again next time.
INTERRUPTED = "interrupted"
# A race's loser: stopped at a rung by the runner's choice, not a failure. Resume and --retry-failed leave it alone.
DROPPED = "dropped"
# Not a row: a raced cell that stopped at a rung with its state saved, waiting for the runner's cut.
PAUSED = "paused"

# Texts of allocation failures that are not torch.cuda.OutOfMemoryError or MemoryError: cuBLAS and cuDNN
# report theirs (CUBLAS_STATUS_ALLOC_FAILED) as RuntimeErrors, and the C library says "cannot allocate".
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "alloc_failed")

# Generic advice that torch appends to CUDA and compile errors: the line before it says what happened.
HINTS = re.compile(r"^(Compile with `TORCH_USE_CUDA_DSA`|CUDA kernel errors might be asynchronously|For debugging "
                   r"consider passing CUDA_LAUNCH_BLOCKING|Set TORCHDYNAMO_VERBOSE|Set TORCH_LOGS|You can suppress "
                   r"this exception|Device-side assertions were explicitly omitted)")

# How a scheduler names a job it ended, when the name says more than "killed".
_SCHEDULER_STATES = {"OUT_OF_MEMORY": OOM, "TIMEOUT": TIMEOUT, "DEADLINE": TIMEOUT}


def classify(exc: BaseException) -> str:
    """The status a failure earns: out of memory, something missing, or an error."""
    import torch

    text = str(exc).lower()
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or any(m in text for m in _OOM_TEXT):
        return OOM
    if isinstance(exc, UnavailableError):
        return UNAVAILABLE
    return ERROR


def message(exc: BaseException) -> str:
    """The error's last line that says what went wrong (torch's trailing debugging hints skipped)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not HINTS.match(ln)] or lines
    return said[-1] if said else exc.__class__.__name__


@dataclass
class Ending:
    """How a cell's process ended, as its supervisor saw it: the limits it ran under, why the supervisor
    stopped it (if it did) and its exit code (negative: the signal that ended it)."""

    limit_bytes: int | None = None
    timeout_s: float | None = None
    stopped_for: str | None = None  # OOM, TIMEOUT or INTERRUPTED: the supervisor killed it
    returncode: int | None = None

    def trusts_report(self) -> bool:
        """A result written before the process died (a crash at interpreter teardown) still counts, unless
        the supervisor itself stopped the cell for memory or time."""
        return self.stopped_for is None

    def status(self) -> str:
        if self.stopped_for:
            return self.stopped_for
        return KILLED if self.returncode is not None and self.returncode < 0 else ERROR

    def error(self, log_text: str) -> str:
        """Why a process that left no result ended, and the last thing it wrote to stderr."""
        code = self.returncode
        if self.stopped_for == OOM:
            reason = f"host RAM of the cell's processes passed the limit of {(self.limit_bytes or 0) / 2**30:.2f} GiB"
        elif self.stopped_for == TIMEOUT:
            reason = f"the cell ran past its time limit of {self.timeout_s:g} s"
        elif code is not None and code < 0:
            reason = f"the worker was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                reason += " (often the kernel's out-of-memory killer)"
        else:
            reason = f"the worker exited with code {code} without a result"
        tail = [ln for ln in log_text.splitlines() if ln.strip()]
        return reason + (f"; last output: {tail[-1][:300]}" if tail else "")


def lost(scheduler_state: str | None = None) -> str:
    """The status of a cell whose executor lost it (a node, a Ray worker or a job gone): killed, unless the
    scheduler says it ended the job for its memory or its time."""
    return _SCHEDULER_STATES.get((scheduler_state or "").upper(), KILLED)
