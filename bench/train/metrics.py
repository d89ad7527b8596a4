"""Evaluation: loss, top-1, top-5 and the confusion matrix over a loader, in eval mode, and per-class metrics."""

from __future__ import annotations

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
