"""One cell's training: `run_cell` puts the model and data on the device and hands them to the training loop
(`fit`), the cached-feature probe (`probe`) or the throughput mode (`throughput`); `step` holds the optimizer
step and its parts, `metrics` the evaluation."""

from __future__ import annotations

import dataclasses

import torch

from bench.measure import Clock
from bench.suite import Cell
from bench.train.checkpoint import Checkpoint
from bench.train.context import CellRun, Loaders, Outcome, Progress
from bench.train.fit import WARMUP_STEPS, fit
from bench.train.graphs import make_stepper, resolve_cuda_graphs
from bench.train.metrics import class_metrics, evaluate
from bench.train.probe import FeatureLoader, extract_features, fit_on_features
from bench.train.step import (Plan, Stepper, autocast, classification_loss, default_lr, lr_factor, make_optimizer,
                              make_plan, param_groups, resolve_precision)
from bench.train.throughput import throughput
from bench.train.warmup import configure_cudnn, profiled

__all__ = ["WARMUP_STEPS", "CellRun", "FeatureLoader", "Loaders", "Outcome", "Plan", "Stepper", "autocast",
           "class_metrics", "classification_loss", "default_lr", "evaluate", "extract_features", "lr_factor",
           "make_optimizer", "make_plan", "param_groups", "resolve_precision", "run_cell"]


def uses_feature_cache(cell: Cell) -> bool:
    """A linear probe without augmentation trains its head on features computed once."""
    return (cell.feature_cache == "auto" and cell.freeze == "all" and cell.augment == "none"
            and cell.mode == "train" and not cell.compile)


def run_cell(cell: Cell, splits, backbone, device: torch.device, num_classes: int, progress: Progress,
             checkpoint: Checkpoint | None = None) -> Outcome:
    """Train and evaluate one cell (or time it, in throughput mode); returns row fields and epochs. With a
    `checkpoint`, training resumes from its saved state and saves (or pauses) at epoch boundaries."""
    from bench.loader import make_loader

    model = backbone.model.to(device)
    if cell.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cached = uses_feature_cache(cell)

    def loader(split, train: bool, augment: str):
        return make_loader(split, batch_size=cell.batch_size, resolution=cell.resolution, device=device,
                           augment=augment, train=train, channels_last=cell.channels_last, seed=cell.seed,
                           recipe=backbone.recipe)

    # The cached probe reads every training image once, in order (its FeatureLoader shuffles as the
    # training loader would), so only one copy of the training images goes to the device.
    loaders = Loaders(loader(splits.train, not cached, "none" if cached else cell.augment),
                      loader(splits.val, False, "none") if len(splits.val) else None,
                      loader(splits.test, False, "none"))
    steps_per_epoch = max(1, len(splits.train) // cell.batch_size) if cached else len(loaders.train)
    run = CellRun(cell, make_plan(cell, steps_per_epoch, device), device, num_classes, progress, Clock(device),
                  checkpoint if cell.mode == "train" else None)  # a throughput window is never paused
    # fixed shapes per cell: autotuning pays off after a warm-up, which the H200 run measured at 4-39 s
    configure_cudnn(cell, run.plan, device)
    graphs, note = resolve_cuda_graphs(cell, run.plan, device, cached)
    if note:
        progress({"kind": "warning", "text": note})
    if cached:
        outcome = fit_on_features(run, model, backbone.head, loaders)
    else:
        forward = torch.compile(model) if cell.compile else model
        stepper = make_stepper(model, cell, run.plan, device, forward, graphs,
                               lambda text: progress({"kind": "warning", "text": text}))
        with profiled(stepper, cell, device) as stepper:  # BENCH_PROFILE_WARMUP=1: the first steps, to the log
            outcome = throughput(run, stepper, loaders.train) if cell.mode == "throughput" else \
                fit(run, stepper, loaders, forward)
        graphs = stepper.cuda_graphs  # off where a capture failed
    outcome.ready_at = run.clock.start
    # The resident dataset's share of device memory, so a report can show what the model and its training
    # need on their own (a streaming loader keeps nothing resident).
    outcome.training = dataclasses.replace(
        outcome.training, data_device_bytes=sum(getattr(ld, "device_bytes", 0) for ld in loaders if ld is not None),
        cuda_graphs=graphs,
        # torch.compile's work happens in the warm-up steps
        compile_s=outcome.training.warmup_s if cell.compile else None)
    return outcome
