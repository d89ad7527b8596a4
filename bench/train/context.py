"""What every part of a cell's training shares: the cell, its plan, the device, the clock, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from bench.measure import Clock
from bench.result import Accuracy, Training
from bench.suite import Cell
from bench.train.step import Plan

if TYPE_CHECKING:
    from bench.train.checkpoint import Checkpoint

Progress = Callable[[dict], None]


@dataclass
class CellRun:
    """One cell's training, as the loop, the probe and the throughput mode see it."""

    cell: Cell
    plan: Plan
    device: torch.device
    num_classes: int
    progress: Progress
    clock: Clock
    checkpoint: Checkpoint | None = None  # where the cell's state is saved and resumed (bench/train/checkpoint.py)


class Loaders(NamedTuple):
    train: object
    val: object | None  # None when the cell has no validation split
    test: object


@dataclass
class Outcome:
    """The train stage's two parts of the result (bench/result.py) and the per-epoch table."""

    training: Training = field(default_factory=Training)
    accuracy: Accuracy = field(default_factory=Accuracy)
    epochs: list[dict] = field(default_factory=list)
    ready_at: float = 0.0  # perf_counter when data and model were on the device and training began
    paused: bool = False  # stopped at a race's rung with its state saved: no test pass, no row yet

    @property
    def row(self) -> dict:
        """Both parts' columns, flat (a copy: set a part's fields to change them)."""
        return {**self.training.values(), **self.accuracy.values()}
