"""Batch transforms on the device, shared by both loaders: augmentation at the source resolution, then one resize
to the cell's, with the weights' interpolation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(batch: torch.Tensor, augment: str, gen: torch.Generator | None) -> torch.Tensor:
    """Augment at the source resolution, where it is cheap: uint8 (B, H, W, 3) -> float in [0, 1],
    laid out (B, 3, H, W) over channels-last memory.

    `standard` is torchvision's RandomCrop(padding=H/8, fill=0) + RandomHorizontalFlip, done for the
    whole batch as one gather of shifted (and mirrored) row and column indices; `strong` adds a
    rotation of up to 15 degrees (zero fill) by one `grid_sample`. Resizing comes after, once.
    """
    if augment != "none":
        batch = _crop_flip(batch, gen)
    x = batch.permute(0, 3, 1, 2).float().div_(255)
    if augment == "strong":
        x = _rotate(x, math.radians(15), gen)
    return x


def _crop_flip(batch: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    b, h, w, _ = batch.shape
    pad, dev = max(1, h // 8), batch.device
    padded = F.pad(batch, (0, 0, pad, pad, pad, pad))  # zeros around H and W of (B, H, W, C)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    flip = torch.rand(b, 1, device=dev, generator=gen) < 0.5
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=dev) + dy
    index = torch.arange(b, device=dev)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def _rotate(x: torch.Tensor, max_angle: float, gen: torch.Generator | None) -> torch.Tensor:
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device, generator=gen) * 2 - 1) * max_angle
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize(x: torch.Tensor, resolution: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize to the cell's resolution with the weights' interpolation (antialiased when shrinking, as
    torchvision's Resize is on tensors), on the device."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=(resolution, resolution), mode="nearest-exact")
    return F.interpolate(x, size=(resolution, resolution), mode=interpolation, align_corners=False,
                         antialias=resolution < x.shape[-1])
