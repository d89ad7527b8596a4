"""Throughput mode (`mode: throughput`): warm-up steps, then timed steps on the real pipeline; no evaluation."""

from __future__ import annotations

from bench.result import Accuracy, Training
from bench.train.context import CellRun, Outcome
from bench.train.step import Stepper


def throughput(run: CellRun, stepper: Stepper, train) -> Outcome:
    """timm-style benchmark: images per second of training steps after the warm-up window."""
    cell, plan, clock = run.cell, run.plan, run.clock
    run.progress({"kind": "start", "total_steps": plan.total_steps})
    stepper.module.train()
    step, timed_images, warmup_s = 0, 0, 0.0
    while step < plan.total_steps:
        for x, y in train:
            if step == 0:
                # The clock starts at the first step: building the optimizer and fetching the first batch are setup
                # (setup_s counts to here), so with no warm-up steps the timed window is the steps alone.
                clock.restart()
            stepper(x, y)
            step += 1
            if step > cell.throughput_warmup_steps:
                timed_images += len(y)
            if step == cell.throughput_warmup_steps:
                warmup_s = clock.lap()
            if step >= plan.total_steps:
                break
        run.progress({"kind": "step", "step": step})
    timed_s = clock.lap()
    loss, _ = stepper.read()
    training = Training(train_s=warmup_s + timed_s, warmup_s=warmup_s, warmup_steps=cell.throughput_warmup_steps,
                        images_per_s=timed_images / timed_s, steps_run=step, precision=plan.precision, lr=plan.lr,
                        epochs_run=0)
    epochs = [dict(epoch=0, step=step, lr=stepper.lr, train_loss=loss, epoch_s=timed_s, images_per_s=timed_images / timed_s)]
    return Outcome(training, Accuracy(train_loss_final=loss), epochs)
