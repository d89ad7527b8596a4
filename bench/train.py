"""One cell's fit and evaluate loop: optimizer, schedule, precision, channels_last, compile,
per-epoch metrics, feature caching for linear probes, and the throughput mode.

Metrics accumulate on the device; the host synchronises only where a number is read (end of an
epoch, the end of the warm-up window), so the loop runs at the model's pace.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.loader import EpochBatches
from bench.measure import Clock
from bench.suite import Cell

WARMUP_STEPS = 5  # steps timed apart from the steady state (cuDNN autotuning, allocator growth, compile)
AUX_LOSS_WEIGHT = 0.4  # torchvision's reference weight for Inception/GoogLeNet auxiliary heads
BASE_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}

Progress = Callable[[dict], None]


@dataclass
class Plan:
    """What the loop will do, resolved from a cell and the machine."""

    precision: str
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class Outcome:
    """Numbers for the result row (flat, with units in names) and the per-epoch table."""

    row: dict = field(default_factory=dict)
    epochs: list[dict] = field(default_factory=list)
    ready_at: float = 0.0  # perf_counter when data and model were on the device and training began


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


OPTIMIZERS: dict[str, Callable[[list[dict], Cell, float], torch.optim.Optimizer]] = {
    "sgd": lambda g, c, lr: torch.optim.SGD(g, lr=lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adam": lambda g, c, lr: torch.optim.Adam(g, lr=lr),
    "adamw": lambda g, c, lr: torch.optim.AdamW(g, lr=lr),
}


def lr_factor(step: int, plan: Plan, schedule: str) -> float:
    """Linear warm-up over `plan.warmup_steps`, then cosine decay to zero (or constant)."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, plan.total_steps - plan.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - plan.warmup_steps) / span)))


def make_optimizer(module: nn.Module, cell: Cell, plan: Plan):
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = OPTIMIZERS[cell.optimizer](param_groups(trainable, cell.weight_decay), cell, plan.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, plan, cell.schedule))
    return opt, sched


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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

    def __init__(self, module: nn.Module, cell: Cell, plan: Plan, device: torch.device, forward=None):
        self.module, self.cell, self.plan, self.device = module, cell, plan, device
        self.forward = module if forward is None else forward  # not `or`: a compiled module has no truth value
        self.opt, self.sched = make_optimizer(module, cell, plan)
        self.scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.plan.precision, self.device):
            loss, logits = classification_loss(self.forward(x), y, self.cell.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def read(self) -> tuple[float, float]:
        """Mean loss and top-1 since the last reset (this synchronises)."""
        n = max(1, self.seen)
        return self.loss_sum.item() / n, self.correct.item() / n

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])


@torch.inference_mode()
def evaluate(forward, loader, num_classes: int, precision: str, device: torch.device) -> dict:
    """Loss, top-1, top-5 and the confusion matrix over a loader (deterministic order), in eval mode."""
    was_training = forward.training
    forward.eval()
    loss_sum = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        with autocast(precision, device):
            logits = forward(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        seen += len(y)
    forward.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu()
    n = max(1, seen)
    return {"loss": loss_sum.item() / n, "top1": cm.diag().sum().item() / n, "top5": top5.item() / n, "confusion": cm}


def class_metrics(cm: torch.Tensor) -> dict:
    """Per-class accuracy (= recall) and precision from a confusion matrix (rows: truth)."""
    diag = cm.diag().double()
    recall = diag / cm.sum(1).clamp(min=1).double()
    precision = diag / cm.sum(0).clamp(min=1).double()
    return {
        "per_class_top1": recall.tolist(),
        "per_class_recall": recall.tolist(),
        "per_class_precision": precision.tolist(),
        "confusion_matrix": cm.tolist(),
    }


class FeatureLoader(EpochBatches):
    """Batches of cached backbone features, in the same order the image loader would give them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int):
        super().__init__(labels, batch_size, train, seed)
        self.features = features

    def __iter__(self):
        for idx, _ in self.index_batches():
            yield self.features[idx], self.labels[idx]


@torch.inference_mode()
def extract_features(model: nn.Module, head: nn.Module, loader, precision: str, device: torch.device):
    """Run the frozen backbone once; the head's input is the feature vector (a hook catches it)."""
    feats, labels = [], []
    hook = head.register_forward_hook(lambda _m, inputs, _out: feats.append(inputs[0].float().clone()))
    model.eval()
    try:
        for x, y in loader:
            with autocast(precision, device):
                model(x)
            labels.append(y)
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(labels)


def run_cell(cell: Cell, splits, backbone, device: torch.device, num_classes: int, progress: Progress) -> Outcome:
    """Train and evaluate one cell (or time it, in throughput mode); returns row fields and epochs."""
    from bench.loader import make_loader

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per cell: autotuning pays off after warm-up
    model = backbone.model.to(device)
    if cell.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cached = (cell.feature_cache == "auto" and cell.freeze == "all" and cell.augment == "none"
              and cell.mode == "train" and not cell.compile)

    def loader(split, train: bool, augment: str):
        return make_loader(split, batch_size=cell.batch_size, resolution=cell.resolution, device=device,
                           augment=augment, train=train, channels_last=cell.channels_last, seed=cell.seed,
                           recipe=backbone.recipe)

    # The cached probe reads every training image once, in order (its FeatureLoader shuffles as the
    # training loader would), so only one copy of the training images goes to the device.
    train = loader(splits.train, not cached, "none" if cached else cell.augment)
    val = loader(splits.val, False, "none") if len(splits.val) else None
    test = loader(splits.test, False, "none")
    steps_per_epoch = max(1, len(splits.train) // cell.batch_size) if cached else len(train)
    plan = make_plan(cell, steps_per_epoch, device)
    clock = Clock(device)
    if cached:
        outcome = _fit_on_features(cell, plan, model, backbone.head, (train, val, test), device, num_classes, progress, clock)
    else:
        forward = torch.compile(model) if cell.compile else model
        stepper = Stepper(model, cell, plan, device, forward)
        if cell.mode == "throughput":
            outcome = _throughput(cell, plan, stepper, train, device, progress, clock)
        else:
            outcome = _fit(cell, plan, stepper, (train, val, test), forward, device, num_classes, progress, clock)
    outcome.ready_at = clock.start
    return outcome


def _fit_on_features(cell, plan, model, head, loaders, device, num_classes, progress, clock) -> Outcome:
    """Linear probe on cached features: one backbone pass instead of one per epoch."""
    precision = plan.precision
    cached = []
    for i, ld in enumerate(loaders):
        if ld is None:
            cached.append(None)
            continue
        f, y = extract_features(model, head, ld, precision, device)
        cached.append(FeatureLoader(f, y, cell.batch_size, train=i == 0, seed=cell.seed))
    extract_s = clock.lap()
    # The cached features are fp32; the head is tiny, so it trains in fp32 whatever the cell says.
    plan.precision = "fp32"
    stepper = Stepper(head, cell, plan, device)
    outcome = _fit(cell, plan, stepper, tuple(cached), head, device, num_classes, progress, clock)
    # The backbone pass is part of what the probe cost: train_s and images/s include it, so a cached
    # probe compares honestly with the same cell trained end to end.
    row = outcome.row
    row["train_s"] += extract_s
    row["images_per_s"] = row["steps_run"] * cell.batch_size / row["train_s"] if row["train_s"] else None
    row.update(feature_cache_used=True, feature_extract_s=extract_s, precision=precision)
    return outcome


def _throughput(cell, plan, stepper, train, device, progress, clock) -> Outcome:
    """timm-style benchmark: warm-up steps, then timed steps on the real pipeline; no evaluation."""
    progress({"kind": "start", "total_steps": plan.total_steps})
    stepper.module.train()
    step, timed_images, warmup_s = 0, 0, 0.0
    while step < plan.total_steps:
        for x, y in train:
            stepper(x, y)
            step += 1
            if step > cell.throughput_warmup_steps:
                timed_images += len(y)
            if step == cell.throughput_warmup_steps:
                warmup_s = clock.lap()
            if step >= plan.total_steps:
                break
        progress({"kind": "step", "step": step})
    timed_s = clock.lap()
    loss, _ = stepper.read()
    row = dict(train_s=warmup_s + timed_s, warmup_s=warmup_s, warmup_steps=cell.throughput_warmup_steps,
               images_per_s=timed_images / timed_s, steps_run=step, train_loss_final=loss,
               precision=plan.precision, lr=plan.lr, epochs_run=0)
    epochs = [dict(epoch=0, step=step, lr=stepper.lr, train_loss=loss, epoch_s=timed_s, images_per_s=timed_images / timed_s)]
    return Outcome(row, epochs)


@dataclass
class _Timing:
    train_s: float = 0.0
    eval_s: float = 0.0
    warmup_s: float | None = None
    warmup_images: int = 0
    images: int = 0


def _fit(cell, plan, stepper, loaders, forward, device, num_classes, progress, clock) -> Outcome:
    """Epochs of training with a validation pass after each, then one evaluation on the test set."""
    train, val, test = loaders
    progress({"kind": "start", "total_steps": plan.total_steps})
    t, step, epochs, best, reached_s = _Timing(), 0, [], None, None
    warm = min(WARMUP_STEPS, plan.total_steps)
    for epoch in range(cell.epochs):
        stepper.module.train()
        stepper.reset()
        clock.lap()
        epoch_s, epoch_images = 0.0, 0
        for x, y in train:
            stepper(x, y)
            step += 1
            epoch_images += len(y)
            if step == warm:  # the one extra synchronisation: where the warm-up window ends
                epoch_s += clock.lap()
                t.warmup_s, t.warmup_images = t.train_s + epoch_s, t.images + epoch_images
            if step % 20 == 0:
                progress({"kind": "step", "step": step})
            if step >= plan.total_steps:
                break
        train_loss, train_top1 = stepper.read()
        epoch_s += clock.lap()
        t.train_s, t.images = t.train_s + epoch_s, t.images + epoch_images
        record = dict(epoch=epoch, step=step, lr=stepper.lr, train_loss=train_loss, train_top1=train_top1,
                      epoch_s=epoch_s, images_per_s=epoch_images / epoch_s if epoch_s else None)
        if val is not None:
            v = evaluate(forward, val, num_classes, plan.precision, device)
            t.eval_s += clock.lap()
            record.update(val_loss=v["loss"], val_top1=v["top1"])
            best = v["top1"] if best is None else max(best, v["top1"])
        epochs.append(record)
        progress({"kind": "epoch", **record})
        if cell.target_top1 is not None and record.get("val_top1", 0) >= cell.target_top1:
            reached_s = t.train_s
            break
        if step >= plan.total_steps:
            break
    clock.lap()
    final = evaluate(forward, test, num_classes, plan.precision, device)
    t.eval_s += clock.lap()
    return Outcome(_fit_row(cell, plan, t, step, epochs, best, reached_s, final), epochs)


def _fit_row(cell, plan, t: _Timing, step, epochs, best, reached_s, final) -> dict:
    steady_s = t.train_s - (t.warmup_s or 0.0)
    steady_images = t.images - t.warmup_images
    if steady_s <= 0 or steady_images <= 0:  # too few steps for a steady state: use the whole run
        steady_s, steady_images = t.train_s, t.images
    last = epochs[-1] if epochs else {}
    row = dict(
        precision=plan.precision, lr=plan.lr, steps_run=step, epochs_run=len(epochs),
        train_s=t.train_s, eval_s=t.eval_s, warmup_s=t.warmup_s, warmup_steps=min(WARMUP_STEPS, step),
        images_per_s=steady_images / steady_s if steady_s > 0 else None,
        top1=final["top1"], top5=final["top5"], val_top1_best=best, val_top1_final=last.get("val_top1"),
        train_loss_final=last.get("train_loss"), val_loss_final=last.get("val_loss"),
        target_reached=None if cell.target_top1 is None else reached_s is not None, time_to_target_s=reached_s,
        feature_cache_used=False,
    )
    row.update(class_metrics(final["confusion"]))
    return row
