"""The device-resident loader: batches from a uint8 array held on the device.

CIFAR-sized data lives on the device as uint8 (CIFAR-10: 150 MB) and every batch is augmented,
resized and normalised there, so host RAM never holds a resized copy of the dataset and the GPU
never waits on a CPU pipeline (airbench's approach). Image folders too big to keep resident fall
back to a DataLoader with workers behind the same interface (`bench/streaming.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bench.data import FileList, ImageArrays
from bench.recipe import IMAGENET, InputRecipe


class EpochBatches:
    """Index batches over tensors held on one device: a fresh permutation per epoch when training
    (drawn from `seed` and the epoch number, so runs repeat and epochs differ), in order otherwise."""

    def __init__(self, labels: torch.Tensor, batch_size: int, train: bool, seed: int):
        self.labels, self.batch_size, self.train, self.seed, self.epoch = labels, batch_size, train, seed, 0

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n = self.num_images
        # Training drops the ragged last batch (fixed shapes keep cuDNN autotuning and compile happy).
        return max(1, n // self.batch_size) if self.train else math.ceil(n / self.batch_size)

    def index_batches(self) -> Iterator[tuple[torch.Tensor, torch.Generator]]:
        device = self.labels.device
        gen = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        n = self.num_images
        order = torch.randperm(n, device=device, generator=gen) if self.train else torch.arange(n, device=device)
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size], gen


class DeviceLoader(EpochBatches):
    """Batches from a uint8 array held on the device, augmented, normalised and resized per batch."""

    def __init__(self, data: ImageArrays, *, batch_size: int, resolution: int, device: torch.device,
                 augment: str = "standard", train: bool = True, channels_last: bool = True, seed: int = 0,
                 recipe: InputRecipe = IMAGENET):
        super().__init__(torch.from_numpy(data.labels).to(device), batch_size, train, seed)
        self.images = torch.from_numpy(data.images).to(device)  # (N, H, W, 3) uint8: 4x smaller than float
        self.resolution, self.device, self.channels_last = resolution, device, channels_last
        self.augment = augment if train else "none"
        self.recipe = recipe
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)

    @property
    def device_bytes(self) -> int:
        """What the resident images and labels occupy on the device."""
        return self.images.nbytes + self.labels.nbytes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx, gen in self.index_batches():
            yield self.transform(self.images[idx], gen), self.labels[idx]

    def transform(self, batch: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, R, R), augmented when training."""
        x = augment_batch(batch, self.augment, gen)
        x = (x - self.mean) / self.std
        x = resize(x, self.resolution, self.recipe.interpolation)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()


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


def make_loader(split: ImageArrays | FileList, *, batch_size: int, resolution: int, device: torch.device,
                augment: str, train: bool, channels_last: bool, seed: int, recipe: InputRecipe = IMAGENET):
    """The resident loader for decoded arrays, the streaming one for file lists; same interface, same recipe."""
    kwargs = dict(batch_size=batch_size, resolution=resolution, device=device, augment=augment,
                  train=train, channels_last=channels_last, seed=seed, recipe=recipe)
    if isinstance(split, ImageArrays):
        return DeviceLoader(split, **kwargs)
    from bench.streaming import StreamingLoader

    return StreamingLoader(split, **kwargs)
