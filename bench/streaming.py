"""The fallback for image folders too large to keep on the device: DataLoader workers decode each file to
the stored side, then every batch goes through the device loader's own steps, behind the same interface.

Only where the uint8 pixels come from differs between the two paths: the workers call the function the
resident path stores with (`bench.imagefolder.stored_image`: RGB, short-side resize, centre crop), and the
batch is augmented at the stored side, normalised and resized to the cell's resolution by the functions
`loader.DeviceLoader` uses. With `augment: none` both paths give the same tensor for the same image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.augment import augment_batch, resize
from bench.imagefolder import stored_image
from bench.recipe import IMAGENET, InputRecipe
from bench.splits import FileList


class _Files(Dataset):
    """Each file as stored: (S, S, 3) uint8, so the batch that crosses to the device is 4x smaller than float."""

    def __init__(self, files: FileList):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = np.array(stored_image(self.files.paths[i], self.files.stored_resolution))  # a writable copy
        return torch.from_numpy(pixels), int(self.files.labels[i])


class StreamingLoader:
    """Decode on CPU workers, then augment, normalise and resize each batch on the device."""

    def __init__(self, files: FileList, *, batch_size: int, resolution: int, device: torch.device,
                 augment: str = "standard", train: bool = True, channels_last: bool = True, seed: int = 0,
                 recipe: InputRecipe = IMAGENET, workers: int | None = None):
        self.device, self.channels_last, self.train, self.seed = device, channels_last, train, seed
        self.batch_size, self.num_images, self.resolution, self.recipe = batch_size, len(files), resolution, recipe
        self.augment = augment if train else "none"
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
        self.epoch = 0
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.loader = DataLoader(
            _Files(files), batch_size=batch_size, shuffle=train,
            drop_last=train and len(files) >= batch_size, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        """The next epoch's number and the sampler's generator: a resumed cell draws the same batches."""
        return {"epoch": self.epoch, "generator": self.loader.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.loader.generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The augmentation draws from its own generator, seeded per epoch as the device loader's is.
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield self.transform(x, gen), y.to(self.device, non_blocking=True)

    def transform(self, batch: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, R, R): `DeviceLoader.transform`'s steps, in its order."""
        x = augment_batch(batch, self.augment, gen)
        x = (x - self.mean) / self.std
        x = resize(x, self.resolution, self.recipe.interpolation)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
