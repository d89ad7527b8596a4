"""The training loop: epochs of steps with a validation pass after each, then one evaluation on the test set.

Metrics accumulate on the device; the host synchronises only where a number is read (end of an epoch, the end
of the warm-up window), so the loop runs at the model's pace.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bench.result import Accuracy, Training
from bench.train import weightstate
from bench.train.context import CellRun, Loaders, Outcome
from bench.train.metrics import class_metrics, evaluate, pack_correct
from bench.train.step import Stepper

WARMUP_STEPS = 5  # steps timed apart from the steady state (cuDNN autotuning, allocator growth, compile)


@dataclass
class _Timing:
    train_s: float = 0.0
    eval_s: float = 0.0
    warmup_s: float | None = None
    warmup_images: int = 0
    images: int = 0


class BestWeights:
    """The weights of the best validation epoch, kept on disk in a temporary folder so they cost neither VRAM
    nor host RAM (which the cell's memory columns would otherwise count), restored before the test pass.

    Only what training can change is kept (`weightstate.changing_state`), with the state dict's module versions,
    which MNASNet needs to load it back.
    """

    def __init__(self, module: nn.Module):
        self.module, self.epoch = module, None
        self._folder = tempfile.TemporaryDirectory(prefix="bench-best-")
        self._file = Path(self._folder.name) / "best.pt"

    def keep(self, epoch: int) -> None:
        weightstate.save(self._file, weightstate.changing_state(self.module, copy=False), sync=False)
        self.epoch = epoch

    def restore(self) -> None:
        weightstate.restore(self.module, weightstate.load(self._file))

    def close(self) -> None:
        self._folder.cleanup()


def fit(run: CellRun, stepper: Stepper, loaders: Loaders, forward) -> Outcome:
    """Train for the cell's epochs (or steps, or until `target_top1`), then evaluate on the test set once."""
    cell, plan, clock = run.cell, run.plan, run.clock
    run.progress({"kind": "start", "total_steps": plan.total_steps})
    t, step, epochs, best, reached_s = _Timing(), 0, [], None, None
    warm = min(WARMUP_STEPS, plan.total_steps)
    keeper = BestWeights(stepper.module) if cell.restore_best and loaders.val is not None else None
    for epoch in range(cell.epochs):
        stepper.module.train()
        stepper.reset()
        clock.lap()
        epoch_s, epoch_images = 0.0, 0
        for x, y in loaders.train:
            stepper(x, y)
            step += 1
            epoch_images += len(y)
            if step == warm:  # the one extra synchronisation: where the warm-up window ends
                epoch_s += clock.lap()
                t.warmup_s, t.warmup_images = t.train_s + epoch_s, t.images + epoch_images
            if step % 20 == 0:
                run.progress({"kind": "step", "step": step})
            if step >= plan.total_steps:
                break
        train_loss, train_top1 = stepper.read()
        epoch_s += clock.lap()
        t.train_s, t.images = t.train_s + epoch_s, t.images + epoch_images
        record = dict(epoch=epoch, step=step, lr=stepper.lr, train_loss=train_loss, train_top1=train_top1,
                      epoch_s=epoch_s, images_per_s=epoch_images / epoch_s if epoch_s else None)
        if loaders.val is not None:
            v = evaluate(forward, loaders.val, run.num_classes, plan.precision, run.device)
            t.eval_s += clock.lap()
            record.update(val_loss=v["loss"], val_top1=v["top1"])
            if best is None or v["top1"] > best:
                best = v["top1"]
                if keeper is not None:
                    keeper.keep(epoch)
                    t.eval_s += clock.lap()  # keeping the best weights is part of the validation bookkeeping
        epochs.append(record)
        run.progress({"kind": "epoch", **record})
        if cell.target_top1 is not None and record.get("val_top1", 0) >= cell.target_top1:
            reached_s = t.train_s
            break
        if step >= plan.total_steps:
            break
    clock.lap()
    best_epoch = len(epochs) - 1
    if keeper is not None:
        if keeper.epoch is not None and keeper.epoch != best_epoch:
            keeper.restore()  # test once, on the weights validation chose: val_top1_best and top1 describe them
        best_epoch = keeper.epoch if keeper.epoch is not None else best_epoch
        keeper.close()
    final = evaluate(forward, loaders.test, run.num_classes, plan.precision, run.device)
    t.eval_s += clock.lap()
    return Outcome(*_parts(run, t, step, epochs, best, best_epoch if epochs else None, reached_s, final), epochs)


def _parts(run: CellRun, t: _Timing, step: int, epochs: list[dict], best, test_epoch, reached_s,
           final: dict) -> tuple[Training, Accuracy]:
    """The row's training and accuracy parts. `val_top1_tested` is the validation score of the weights the test
    pass used (the best epoch's where they were restored, else the last's): a config is ranked on it, so its
    rank and its test figure always describe the same weights."""
    steady_s = t.train_s - (t.warmup_s or 0.0)
    steady_images = t.images - t.warmup_images
    if steady_s <= 0 or steady_images <= 0:  # too few steps for a steady state: use the whole run
        steady_s, steady_images = t.train_s, t.images
    last = epochs[-1] if epochs else {}
    training = Training(
        precision=run.plan.precision, lr=run.plan.lr, steps_run=step, epochs_run=len(epochs),
        train_s=t.train_s, eval_s=t.eval_s, warmup_s=t.warmup_s, warmup_steps=min(WARMUP_STEPS, step),
        images_per_s=steady_images / steady_s if steady_s > 0 else None, feature_cache_used=False,
    )
    accuracy = Accuracy(
        top1=final["top1"], top5=final["top5"], val_top1_best=best, val_top1_final=last.get("val_top1"),
        val_top1_tested=epochs[test_epoch].get("val_top1") if test_epoch is not None else None,
        train_loss_final=last.get("train_loss"), val_loss_final=last.get("val_loss"),
        target_reached=None if run.cell.target_top1 is None else reached_s is not None,
        time_to_target_s=reached_s, test_epoch=test_epoch, **class_metrics(final["confusion"]),
        test_correct=pack_correct(final["correct"]),
    )
    return training, accuracy
