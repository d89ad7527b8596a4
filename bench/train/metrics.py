"""Evaluation: loss, top-1, top-5 and the confusion matrix over a loader, in eval mode, and per-class metrics."""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.nn.functional as F

from bench.train.step import autocast


@torch.inference_mode()
def evaluate(forward, loader, num_classes: int, precision: str, device: torch.device) -> dict:
    """Loss, top-1, top-5 and the confusion matrix over a loader (deterministic order), in eval mode."""
    was_training = forward.training
    forward.eval()
    loss_sum = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    correct = []  # per image, in loader order: what a paired test between two cells compares
    seen = 0
    for x, y in loader:
        with autocast(precision, device):
            logits = forward(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()
        predicted = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes * num_classes)
        correct.append(predicted == y)
        seen += len(y)
    forward.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu()
    n = max(1, seen)
    right = torch.cat(correct).cpu() if correct else torch.zeros(0, dtype=torch.bool)
    return {"loss": loss_sum.item() / n, "top1": cm.diag().sum().item() / n, "top5": top5.item() / n,
            "confusion": cm, "correct": right}


def pack_correct(correct: torch.Tensor) -> str:
    """Which test images a cell got right, bit-packed (numpy's packbits order) and base64 text: 1.7 kB for
    CIFAR-10's 10,000 test images, enough for a paired test between any two cells on the same test set."""
    return base64.b64encode(np.packbits(correct.numpy().astype(bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, count: int) -> np.ndarray:
    """The boolean vector `pack_correct` stored, `count` images long."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=count).astype(bool)


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
