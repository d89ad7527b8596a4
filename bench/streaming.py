"""The fallback for image folders too large to keep on the device: a DataLoader with workers and
torchvision.transforms.v2, behind the same interface as `loader.DeviceLoader`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from bench.data import FileList
from bench.recipe import IMAGENET, InputRecipe


def build_transform(resolution: int, augment: str, train: bool, recipe: InputRecipe = IMAGENET) -> v2.Compose:
    """The same recipe as the device loader: resize, crop with padding, flip (rotation for `strong`), the
    weights' own mean, std and interpolation."""
    mode = v2.InterpolationMode(recipe.interpolation)
    steps: list = [v2.ToImage(), v2.Resize(resolution, interpolation=mode, antialias=True), v2.CenterCrop(resolution)]
    if train and augment != "none":
        steps += [v2.RandomCrop(resolution, padding=max(1, resolution // 8)), v2.RandomHorizontalFlip()]
        if augment == "strong":
            steps.append(v2.RandomRotation(15))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(recipe.mean), list(recipe.std))]
    return v2.Compose(steps)


class _Files(Dataset):
    def __init__(self, files: FileList, transform: v2.Compose):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files.paths[i]) as img:
            return self.transform(img.convert("RGB")), int(self.files.labels[i])


class StreamingLoader:
    """Decode and augment on CPU workers, then move each batch to the device."""

    def __init__(self, files: FileList, *, batch_size: int, resolution: int, device: torch.device,
                 augment: str = "standard", train: bool = True, channels_last: bool = True, seed: int = 0,
                 recipe: InputRecipe = IMAGENET, workers: int | None = None):
        self.device, self.channels_last, self.train = device, channels_last, train
        self.batch_size, self.num_images = batch_size, len(files)
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.loader = DataLoader(
            _Files(files, build_transform(resolution, augment, train, recipe)), batch_size=batch_size, shuffle=train,
            drop_last=train and len(files) >= batch_size, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True, memory_format=fmt), y.to(self.device, non_blocking=True)
