"""What every part of a cell's training shares: the cell, its plan, the device, the clock, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from bench.measure import Clock
from bench.suite import Cell
from bench.train.step import Plan

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


class Loaders(NamedTuple):
    train: object
    val: object | None  # None when the cell has no validation split
    test: object


@dataclass
class Outcome:
    """Numbers for the result row (flat, with units in names) and the per-epoch table."""

    row: dict = field(default_factory=dict)
    epochs: list[dict] = field(default_factory=list)
    ready_at: float = 0.0  # perf_counter when data and model were on the device and training began
