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

from bench.augment import augment_batch, resize
from bench.recipe import IMAGENET, InputRecipe
from bench.splits import FileList, ImageArrays
from bench.streaming import StreamingLoader


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

    def state_dict(self) -> dict:
        """Where the shuffling stands (the next epoch's number): what a resumed cell needs to draw the same batches."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

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


def make_loader(split: ImageArrays | FileList, *, batch_size: int, resolution: int, device: torch.device,
                augment: str, train: bool, channels_last: bool, seed: int, recipe: InputRecipe = IMAGENET):
    """The resident loader for decoded arrays, the streaming one for file lists; same interface, same recipe."""
    kwargs = dict(batch_size=batch_size, resolution=resolution, device=device, augment=augment,
                  train=train, channels_last=channels_last, seed=seed, recipe=recipe)
    if isinstance(split, ImageArrays):
        return DeviceLoader(split, **kwargs)
    return StreamingLoader(split, **kwargs)
