"""A cell's state at an epoch boundary, saved so that a killed, preempted or raced cell resumes where it stopped.

The folder is `results/SUITE/state/CELL_ID/` (the store names it; the runner deletes it once the cell's row is
ok or dropped):

    state.pt     what training changes (weights, buffers), optimizer, LR schedule, gradient scaler, every RNG,
                 the training loader's place in its shuffling
    best-E.pt    the best epoch's weights when restore_best keeps them (E: that epoch)
    meta.json    written last, so a folder without it holds no state: the cell, epochs done, the loop's
                 bookkeeping (epoch rows, best score, timing), segments and wall time so far

Every write is a temporary file and an atomic rename. On the CPU a resumed cell ends bit for bit where the same
cell run straight through does: the RNGs and the loader's shuffle are restored, and the LR schedule always spans
the cell's full `epochs`. A folder that cannot be read, or that belongs to another cell or bench version, is
reported in one line and the cell starts over.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

import bench
from bench.atomic import atomic_write
from bench.errors import BenchError
from bench.suite import RUNNER_FIELDS, Cell
from bench.train import weightstate

FORMAT = 1
AUTO_EPOCH_S = 60.0  # checkpoint: auto saves once an epoch takes longer than this (a kill then costs over a minute)
STATE, META = "state.pt", "meta.json"


class CheckpointError(BenchError):
    """A cell's saved state cannot be used: unreadable, or another cell's or another bench version's."""


@dataclass
class Checkpoint:
    """Where a cell's state lives and what the runner asked of it: `pause_at` epochs done, save and stop (a race's
    rung); `forced` saves every epoch whatever the cell's `checkpoint` says."""

    folder: Path | None
    cell: Cell
    pause_at: int | None = None
    forced: bool = False
    segments: int = 1  # processes the training has run in, this one included
    resumed_from: int = 0  # epochs the saved state held when this segment began
    prior_wall_s: float = 0.0  # earlier segments' wall time, up to their last save
    resolved: dict = field(default_factory=dict)  # settings as the run resolved them (precision, lr): a dropped row's
    warn: object = print  # one line for the user: a state that could not be used

    def wants(self, epoch: int, epoch_s: float) -> bool:
        """Whether to save after `epoch` (0-based) that took `epoch_s`."""
        if self.folder is None:
            return False
        if self.forced or self.pause_at == epoch + 1 or self.cell.checkpoint == "epoch":
            return True
        return self.cell.checkpoint == "auto" and epoch_s > AUTO_EPOCH_S

    def pauses(self, epochs_done: int) -> bool:
        return self.pause_at is not None and epochs_done >= self.pause_at and epochs_done < self.cell.epochs

    def save(self, loop: dict, stepper, train_loader, keeper) -> None:
        """Save the state after `loop["epochs_done"]` epochs; meta.json last."""
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        best = None
        if keeper is not None and keeper.epoch is not None:
            best = f"best-{keeper.epoch}.pt"
            if not (folder / best).is_file():
                atomic_write(folder / best, lambda f: _copy_into(keeper.file, f))
        payload = {"format": FORMAT, "epochs_done": loop["epochs_done"],
                   "weights": weightstate.pack(weightstate.changing_state(stepper.module, copy=False)),
                   "optimizer": stepper.opt.state_dict(), "schedule": stepper.sched.state_dict(),
                   "scaler": stepper.scaler.state_dict(), "rng": _rng_state(), "loader": train_loader.state_dict()}
        atomic_write(folder / STATE, lambda f: torch.save(payload, f))
        meta = {"format": FORMAT, "bench_version": bench.__version__, "cell_id": self.cell.id,
                "cell": self.cell.canonical(RUNNER_FIELDS), "epochs_done": loop["epochs_done"], "loop": loop, "best_file": best,
                "segments": self.segments, "wall_s": self.prior_wall_s + _process_age_s(), "resolved": self.resolved}
        atomic_write(folder / META, lambda f: f.write(json.dumps(meta, default=float).encode()))
        for old in folder.glob("best-*.pt"):  # only the one meta.json names is still needed
            if old.name != best:
                old.unlink(missing_ok=True)

    def resume(self, stepper, train_loader, keeper) -> dict | None:
        """Restore the saved state into the stepper, the loader and the best-weights keeper; return the loop's
        bookkeeping, or None to start afresh (no state, or one that cannot be used: said in one line, removed)."""
        if self.folder is None or not (self.folder / META).is_file():
            return None
        try:
            meta, payload = self._read()
            _apply(payload, stepper, train_loader)
        except CheckpointError as exc:
            self.warn(f"cell {self.cell.id}: {exc}; the cell starts over from epoch 0")
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        if keeper is not None and meta.get("best_file"):
            keeper.adopt(self.folder / meta["best_file"], meta["loop"]["keeper_epoch"])
        self.segments = int(meta["segments"]) + 1
        self.resumed_from = int(meta["epochs_done"])
        self.prior_wall_s = float(meta["wall_s"])
        return meta["loop"]

    def _read(self) -> tuple[dict, dict]:
        where = f"saved state {self.folder}"
        try:
            meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where} is unreadable ({exc.__class__.__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("bench_version") != bench.__version__:
            raise CheckpointError(f"{where} was written by another bench version "
                                  f"({meta.get('bench_version') if isinstance(meta, dict) else '?'})")
        if meta.get("cell") != self.cell.canonical(RUNNER_FIELDS):
            raise CheckpointError(f"{where} belongs to another config (cell {meta.get('cell_id')})")
        try:
            payload = torch.load(self.folder / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, missing file: all mean "unusable"
            raise CheckpointError(f"{where}: {STATE} cannot be read ({exc.__class__.__name__})") from None
        if not isinstance(payload, dict) or payload.get("epochs_done") != meta.get("epochs_done"):
            raise CheckpointError(f"{where}: {STATE} and {META} disagree on the epochs done")
        return meta, payload


def _apply(payload: dict, stepper, train_loader) -> None:
    """Put the state into the stepper and loader; on a failure part-way, the weights go back as they were."""
    before = weightstate.changing_state(stepper.module)
    try:
        weightstate.restore(stepper.module, weightstate.unpack(payload["weights"]))
        stepper.opt.load_state_dict(payload["optimizer"])
        stepper.sched.load_state_dict(payload["schedule"])
        stepper.scaler.load_state_dict(payload["scaler"])
        train_loader.load_state_dict(payload["loader"])
        _set_rng_state(payload["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, weightstate.StateError) as exc:
        weightstate.restore(stepper.module, before)
        raise CheckpointError(f"the saved state does not fit this cell ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _copy_into(source: Path, out) -> None:
    with open(source, "rb") as f:
        shutil.copyfileobj(f, out)


def _process_age_s() -> float:
    """Wall time since this process began (a forked worker's fork, a fresh one's start)."""
    return max(0.0, time.time() - psutil.Process().create_time())
