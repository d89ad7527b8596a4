"""One optimizer step and what it is made of: the plan (precision, learning rate, steps), optimizers with
weight decay on weights only, warm-up and cosine schedules, autocast, the loss (auxiliary heads included),
and the `Stepper` that keeps its running metrics on the device (no host sync per step)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.suite import Cell

AUX_LOSS_WEIGHT = 0.4  # torchvision's reference weight for Inception/GoogLeNet auxiliary heads
BASE_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}


@dataclass
class Plan:
    """What the loop will do, resolved from a cell and the machine."""

    precision: str
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def resolve_precision(cell: Cell, device: torch.device) -> str:
    if cell.precision != "auto":
        return cell.precision
    # Native bf16 only (Ampere and later): on older GPUs torch would emulate it, slower than fp32.
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def default_lr(cell: Cell) -> float:
    """Documented defaults: a linear probe wants 10x the fine-tuning rate, training from scratch 5x."""
    if cell.lr is not None:
        return cell.lr
    lr = BASE_LR[cell.optimizer]
    if cell.freeze == "all":
        return lr * 10
    return lr * 5 if not cell.pretrained else lr


def make_plan(cell: Cell, steps_per_epoch: int, device: torch.device) -> Plan:
    total = cell.epochs * steps_per_epoch
    if cell.steps is not None:
        total = min(total, cell.steps)
    if cell.mode == "throughput":
        total = cell.throughput_warmup_steps + cell.throughput_steps
    warm = int(cell.warmup_fraction * total) if cell.mode == "train" else 0
    return Plan(resolve_precision(cell, device), default_lr(cell), steps_per_epoch, total, warm)


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on weights only: norms and biases (1-d tensors) are not decayed."""
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# `fused`: one kernel per update whose state and learning rate stay on the device: what a CUDA graph can replay
# (bench/train/graphs.py); None keeps torch's default (foreach).
OPTIMIZERS: dict[str, Callable[[list[dict], Cell, float, bool | None], torch.optim.Optimizer]] = {
    "sgd": lambda g, c, lr, fused: torch.optim.SGD(g, lr=lr, momentum=c.momentum, nesterov=c.momentum > 0, fused=fused),
    "adam": lambda g, c, lr, fused: torch.optim.Adam(g, lr=lr, fused=fused),
    "adamw": lambda g, c, lr, fused: torch.optim.AdamW(g, lr=lr, fused=fused),
}


def lr_factor(step: int, plan: Plan, schedule: str) -> float:
    """Linear warm-up over `plan.warmup_steps`, then cosine decay to zero (or constant)."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, plan.total_steps - plan.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - plan.warmup_steps) / span)))


def make_optimizer(module: nn.Module, cell: Cell, plan: Plan, fused: bool | None = None):
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = OPTIMIZERS[cell.optimizer](param_groups(trainable, cell.weight_decay), cell, plan.lr, fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan, cell.schedule))
    return opt, sched


def autocast(precision: str, device: torch.device, cache: bool = True):
    """`cache=False` for a step a CUDA graph captures: autocast's cache of cast weights would outlive the capture."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def classification_loss(out, y: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and main logits; auxiliary heads (Inception, GoogLeNet in train mode) add 0.4 x their loss."""
    if isinstance(out, tuple):
        logits, aux = out[0], [o for o in out[1:] if o is not None]
    else:
        logits, aux = out, []
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    for extra in aux:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(extra, y, label_smoothing=smoothing)
    return loss, logits


class Stepper:
    """One optimizer step at a time; keeps running sums on the device (no host sync per step)."""

    cuda_graphs = "off"  # what the row records: this stepper runs every step eagerly
    FUSED: bool | None = None  # the optimizer's implementation (OPTIMIZERS)

    def __init__(self, module: nn.Module, cell: Cell, plan: Plan, device: torch.device, forward=None):
        self.module, self.cell, self.plan, self.device = module, cell, plan, device
        self.forward = module if forward is None else forward  # not `or`: a compiled module has no truth value
        self.opt, self.sched = make_optimizer(module, cell, plan, fused=self.FUSED)
        self.scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def reset(self) -> None:
        # in place: a captured CUDA graph adds into these very tensors
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.step(x, y)
        self.sched.step()
        self.seen += len(y)

    def step(self, x: torch.Tensor, y: torch.Tensor, cache: bool = True) -> None:
        """Forward, loss, backward, the optimizer and the metric sums: everything on the device, no host sync."""
        with autocast(self.plan.precision, self.device, cache):
            loss, logits = classification_loss(self.forward(x), y, self.cell.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()

    def read(self) -> tuple[float, float]:
        """Mean loss and top-1 since the last reset (this synchronises)."""
        n = max(1, self.seen)
        return self.loss_sum.item() / n, self.correct.item() / n

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])
