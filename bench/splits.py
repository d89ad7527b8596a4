"""What a dataset is once read: decoded arrays or, for image folders too big to keep resident, file lists, and the
train / validation / test cut of them. `bench/data.py` makes these, `bench/imagefolder.py` reads folders into
them, and the loaders (`bench/loader.py`, `bench/streaming.py`) batch from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageArrays:
    """Decoded images (N, H, W, 3) uint8 and their labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ImageArrays:
        return ImageArrays(self.images[index], self.labels[index])


@dataclass
class Splits:
    """A dataset cut into train / validation / test, ready for a loader."""

    name: str
    classes: list[str]
    train: ImageArrays | FileList
    val: ImageArrays | FileList
    test: ImageArrays | FileList
    loader: str  # "resident" or "streaming"
    stored_resolution: int | None = None  # the side image-folder images are stored at; None: the dataset's own


@dataclass
class FileList:
    """Image files on disk and their labels, for the streaming path, which brings each image to the
    stored side exactly as the resident path stores it (`bench.imagefolder.stored_image`)."""

    paths: list[str]
    labels: np.ndarray
    stored_resolution: int

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> FileList:
        return FileList([self.paths[i] for i in index], self.labels[index], self.stored_resolution)


@dataclass
class Raw:
    classes: list[str]
    train: ImageArrays | FileList
    test: ImageArrays | FileList
    val: ImageArrays | FileList | None = None
    stored_resolution: int | None = None  # image folders: the side every image is stored at
