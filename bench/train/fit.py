"""The training loop: epochs of steps with a validation pass after each, then one evaluation on the test set.

Metrics accumulate on the device; the host synchronises only where a number is read (end of an epoch, the end
of the warm-up window), so the loop runs at the model's pace.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.result import Accuracy, Training
from bench.train import weightstate
from bench.train.context import CellRun, Loaders, Outcome
from bench.train.metrics import class_metrics, evaluate, pack_correct
from bench.train.step import Stepper

WARMUP_STEPS = 5  # steps timed apart from the steady state (cuDNN autotuning, allocator growth, compile)


@dataclass
class _Loop:
    """The loop's bookkeeping: everything a resumed cell needs besides weights and RNGs (saved in meta.json)."""

    epochs_done: int = 0
    step: int = 0
    epochs: list[dict] = field(default_factory=list)
    best: float | None = None  # the best validation top-1 so far
    keeper_epoch: int | None = None  # the epoch whose weights BestWeights holds
    reached_s: float | None = None  # train time when target_top1 was reached
    train_s: float = 0.0
    eval_s: float = 0.0
    warmup_s: float | None = None
    warmup_images: int = 0
    images: int = 0


class BestWeights:
    """The weights of the best validation epoch, kept on disk in a temporary folder so they cost neither VRAM
    nor host RAM (which the cell's memory columns would otherwise count), restored before the test pass.

    Only what training can change is kept (`weightstate.changing_state`), with the state dict's module versions,
    which MNASNet needs to load it back. The cell holds a lock on the folder while it lives: a cell killed outright
    (SIGKILL, a lost node, a preemption) cannot remove its folder, so the next one on the machine removes those
    nobody holds (a ViT-L's best weights are over a gigabyte; a farm kills cells every night).
    """

    PREFIX = "bench-best-"

    def __init__(self, module: nn.Module):
        self.module, self.epoch = module, None
        sweep_orphans(Path(tempfile.gettempdir()), self.PREFIX)
        self._folder = tempfile.TemporaryDirectory(prefix=self.PREFIX)
        folder = Path(self._folder.name)
        self._lock = open(folder / "lock.new", "wb")  # noqa: SIM115 (held until close)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.replace(folder / "lock.new", folder / "lock")  # a sweeper sees `lock` only once it is held
        self.file = Path(self._folder.name) / "best.pt"

    def keep(self, epoch: int) -> None:
        weightstate.save(self.file, weightstate.changing_state(self.module, copy=False), sync=False)
        self.epoch = epoch

    def adopt(self, saved: Path, epoch: int) -> None:
        """Take over weights a checkpoint kept (a resumed cell's best epoch so far)."""
        shutil.copyfile(saved, self.file)
        self.epoch = epoch

    def restore(self) -> None:
        weightstate.restore(self.module, weightstate.load(self.file))

    def close(self) -> None:
        self._lock.close()
        self._folder.cleanup()


def sweep_orphans(folder: Path, prefix: str) -> list[Path]:
    """Remove PREFIX* folders whose `lock` file nobody holds (its process ended: the kernel drops a dead process's
    locks, in whatever pid namespace it ran); returns what went. A folder without a lock (an older bench's) or
    that cannot be opened (another user's) is left alone."""
    gone = []
    for path in folder.glob(f"{prefix}*"):
        try:
            with open(path / "lock", "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (its cell is alive), absent, or not ours
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


def fit(run: CellRun, stepper: Stepper, loaders: Loaders, forward) -> Outcome:
    """Train for the cell's epochs (or steps, or until `target_top1`), then evaluate on the test set once.
    With a checkpoint, resume from the saved state, save after epochs, and pause where the runner asked."""
    cell, plan, clock, ckpt = run.cell, run.plan, run.clock, run.checkpoint
    run.progress({"kind": "start", "total_steps": plan.total_steps})
    keeper = BestWeights(stepper.module) if cell.restore_best and loaders.val is not None else None
    saved = ckpt.resume(stepper, loaders.train, keeper) if ckpt is not None else None
    loop = _Loop(**saved) if saved else _Loop()
    if saved:
        run.progress({"kind": "step", "step": loop.step})
    try:
        while not _finished(loop, cell, plan):
            if ckpt is not None and ckpt.pauses(loop.epochs_done):
                return _paused(run, loop)
            epoch_s = _epoch(run, stepper, loaders, forward, loop, keeper)
            if ckpt is not None and ckpt.wants(loop.epochs_done - 1, epoch_s):
                # what a row made from the saved state alone (a race's dropped cell) reports as used
                ckpt.resolved = {"precision": plan.precision, "lr": plan.lr, "cuda_graphs": stepper.cuda_graphs,
                                 "cudnn_benchmark": torch.backends.cudnn.benchmark}
                ckpt.save(dataclasses.asdict(loop), stepper, loaders.train, keeper)
                clock.lap()  # saving is neither training nor evaluation
        clock.lap()
        best_epoch = loop.epochs_done - 1
        if keeper is not None and keeper.epoch is not None:
            if keeper.epoch != best_epoch:
                keeper.restore()  # test once, on the weights validation chose: val_top1_tested and top1 describe them
            best_epoch = keeper.epoch
    finally:
        if keeper is not None:
            keeper.close()
    final = evaluate(forward, loaders.test, run.num_classes, plan.precision, run.device)
    loop.eval_s += clock.lap()
    return Outcome(*_parts(run, loop, best_epoch if loop.epochs else None, final), loop.epochs)


def _finished(loop: _Loop, cell, plan) -> bool:
    """All epochs run, the step cap hit, or the target reached."""
    return (loop.epochs_done >= cell.epochs or loop.step >= plan.total_steps or loop.reached_s is not None)


def _epoch(run: CellRun, stepper: Stepper, loaders: Loaders, forward, loop: _Loop, keeper) -> float:
    """Train one epoch and validate it; returns its training seconds."""
    cell, plan, clock = run.cell, run.plan, run.clock
    warm = min(WARMUP_STEPS, plan.total_steps)
    stepper.module.train()
    stepper.reset()
    clock.lap()
    epoch_s, epoch_images = 0.0, 0
    for x, y in loaders.train:
        stepper(x, y)
        loop.step += 1
        epoch_images += len(y)
        if loop.step == warm:  # the one extra synchronisation: where the warm-up window ends
            epoch_s += clock.lap()
            loop.warmup_s, loop.warmup_images = loop.train_s + epoch_s, loop.images + epoch_images
        if loop.step % 20 == 0:
            run.progress({"kind": "step", "step": loop.step})
        if loop.step >= plan.total_steps:
            break
    train_loss, train_top1 = stepper.read()
    epoch_s += clock.lap()
    loop.train_s, loop.images = loop.train_s + epoch_s, loop.images + epoch_images
    record = dict(epoch=loop.epochs_done, step=loop.step, lr=stepper.lr, train_loss=train_loss, train_top1=train_top1,
                  epoch_s=epoch_s, images_per_s=epoch_images / epoch_s if epoch_s else None)
    if loaders.val is not None:
        v = evaluate(forward, loaders.val, run.num_classes, plan.precision, run.device)
        loop.eval_s += clock.lap()
        record.update(val_loss=v["loss"], val_top1=v["top1"])
        if loop.best is None or v["top1"] > loop.best:
            loop.best = v["top1"]
            if keeper is not None:
                keeper.keep(loop.epochs_done)
                loop.keeper_epoch = loop.epochs_done
                loop.eval_s += clock.lap()  # keeping the best weights is part of the validation bookkeeping
    loop.epochs.append(record)
    loop.epochs_done += 1
    run.progress({"kind": "epoch", **record})
    if cell.target_top1 is not None and record.get("val_top1", 0) >= cell.target_top1:
        loop.reached_s = loop.train_s
    return epoch_s


def _paused(run: CellRun, loop: _Loop) -> Outcome:
    """A race's rung reached: the state is saved; what the rung needs is the epoch table."""
    last = loop.epochs[-1] if loop.epochs else {}
    training = Training(precision=run.plan.precision, lr=run.plan.lr, steps_run=loop.step, epochs_run=loop.epochs_done,
                        train_s=loop.train_s, eval_s=loop.eval_s, **_segments(run))
    accuracy = Accuracy(val_top1_best=loop.best, val_top1_final=last.get("val_top1"))
    return Outcome(training, accuracy, loop.epochs, paused=True)


def _segments(run: CellRun) -> dict:
    ckpt = run.checkpoint
    return {"resumed_from_epoch": ckpt.resumed_from if ckpt else 0, "segments": ckpt.segments if ckpt else 1}


def _parts(run: CellRun, loop: _Loop, test_epoch: int | None, final: dict) -> tuple[Training, Accuracy]:
    """The row's training and accuracy parts. `val_top1_tested` is the validation score of the weights the test
    pass used (the best epoch's where they were restored, else the last's): a config is ranked on it, so its
    rank and its test figure always describe the same weights."""
    steady_s = loop.train_s - (loop.warmup_s or 0.0)
    steady_images = loop.images - loop.warmup_images
    if steady_s <= 0 or steady_images <= 0:  # too few steps for a steady state: use the whole run
        steady_s, steady_images = loop.train_s, loop.images
    epochs, step = loop.epochs, loop.step
    last = epochs[-1] if epochs else {}
    training = Training(
        precision=run.plan.precision, lr=run.plan.lr, steps_run=step, epochs_run=len(epochs),
        train_s=loop.train_s, eval_s=loop.eval_s, warmup_s=loop.warmup_s, warmup_steps=min(WARMUP_STEPS, step),
        images_per_s=steady_images / steady_s if steady_s > 0 else None, feature_cache_used=False, **_segments(run),
    )
    accuracy = Accuracy(
        top1=final["top1"], top5=final["top5"], val_top1_best=loop.best, val_top1_final=last.get("val_top1"),
        val_top1_tested=epochs[test_epoch].get("val_top1") if test_epoch is not None else None,
        train_loss_final=last.get("train_loss"), val_loss_final=last.get("val_loss"),
        target_reached=None if run.cell.target_top1 is None else loop.reached_s is not None,
        time_to_target_s=loop.reached_s, test_epoch=test_epoch, **class_metrics(final["confusion"]),
        test_correct=pack_correct(final["correct"]),
    )
    return training, accuracy
