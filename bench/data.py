"""Datasets by name, reproducible splits and decoded-image caches: everything up to the uint8 arrays
(or, for image folders too big to keep resident, the file lists) that the loaders batch from.

Batches come from `bench/loader.py` (resident on the device) and `bench/streaming.py` (DataLoader).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import DatasetUnavailableError, UnknownDatasetError, close_matches

# Above this many bytes of decoded uint8 pixels (BENCH_RESIDENT_MAX_BYTES) an image folder streams
# from disk instead of living on the device: 4 GiB holds ImageNet-64 or a few CINIC-10s.
RESIDENT_MAX_BYTES = 4 << 30
SPLIT_SEED = 0  # the validation split and subsets are the same for every cell, so cells compare


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
    """Image files on disk and their labels, for the streaming path."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> FileList:
        return FileList([self.paths[i] for i in index], self.labels[index])


@dataclass
class Raw:
    classes: list[str]
    train: ImageArrays | FileList
    test: ImageArrays | FileList
    val: ImageArrays | FileList | None = None


def default_data_root() -> Path:
    return Path(os.environ.get("BENCH_DATA", Path.home() / ".cache" / "bench" / "data"))


# ---------------------------------------------------------------- registry


def _synthetic(_arg: str, _root: Path, _download: bool) -> Raw:
    return synthetic_raw()


def _cifar10(_arg: str, root: Path, download: bool) -> Raw:
    return _cifar(root, download, hundred=False)


def _cifar100(_arg: str, root: Path, download: bool) -> Raw:
    return _cifar(root, download, hundred=True)


def _cinic10(_arg: str, root: Path, download: bool) -> Raw:
    folder = root / "cinic10"
    if not (folder / "train").is_dir() and download:
        _download_cinic(folder)
    if not (folder / "train").is_dir():
        raise DatasetUnavailableError(
            f"cinic10 is not in {folder} and could not be downloaded; run `bench fetch cinic10` on a machine "
            f"with internet, or unpack CINIC-10.tar.gz into {folder}"
        )
    return read_image_folder(folder, cache_root=root)


def _imagefolder(arg: str, root: Path, _download: bool) -> Raw:
    folder = Path(arg).expanduser()
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DatasetUnavailableError(
            f"imagefolder:{arg} needs {folder}/train and {folder}/test with one sub-folder per class; "
            "check the path or create that layout"
        )
    return read_image_folder(folder, cache_root=root)


DATASETS: dict[str, Callable[[str, Path, bool], Raw]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "cinic10": _cinic10,
    "imagefolder": _imagefolder,
}


def parse_name(dataset: str) -> tuple[str, str]:
    """Split 'imagefolder:/some/path' into ('imagefolder', '/some/path'); check the name is registered."""
    kind, _, arg = dataset.partition(":")
    if kind not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {dataset!r}{close_matches(kind, DATASETS)}; choose one of {', '.join(DATASETS)}")
    if kind == "imagefolder" and not arg:
        raise UnknownDatasetError("imagefolder needs a path: write `dataset: imagefolder:/path/to/folder`")
    return kind, arg


def prepare(dataset: str, data_root: Path | None = None, *, download: bool = True,
            stored_resolution: int | None = None) -> None:
    """Make sure a dataset is on disk (downloading it, decoding an image folder into its cache) once,
    before any cell starts; raises DatasetUnavailableError with the fix when it cannot be had."""
    kind, arg = parse_name(dataset)
    DATASETS[kind](arg, Path(data_root or default_data_root()), download)


def load_splits(
    dataset: str,
    data_root: Path | None = None,
    *,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = True,
    stored_resolution: int | None = None,
) -> Splits:
    """Load a dataset by name and cut it: validation carved from train with a fixed seed, optional subsets."""
    kind, arg = parse_name(dataset)
    raw = DATASETS[kind](arg, Path(data_root or default_data_root()), download)
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(raw.train))
    if raw.val is not None:
        train, val = raw.train.take(order), raw.val
    else:
        n_val = int(round(val_fraction * len(order)))
        train, val = raw.train.take(order[n_val:]), raw.train.take(order[:n_val])
    test = raw.test
    if train_subset is not None:
        train = train.take(np.arange(min(train_subset, len(train))))
    if test_subset is not None:
        pick = np.random.default_rng(SPLIT_SEED + 1).permutation(len(test))[:test_subset]
        test, val = test.take(np.sort(pick)), val.take(np.arange(min(len(val), test_subset)))
    loader = "resident" if isinstance(train, ImageArrays) else "streaming"
    return Splits(dataset, raw.classes, train, val, test, loader)


# ---------------------------------------------------------------- synthetic


def synthetic_raw(num_classes: int = 10, train_size: int = 2000, test_size: int = 500, size: int = 32, seed: int = 0) -> Raw:
    """Class-dependent images a network can learn: each class has its own colour and stripe
    orientation/frequency; position, phase and noise vary per image. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, size=(num_classes, 3))
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)
    freqs = 2 + (np.arange(num_classes) % 3)

    def make(n: int) -> ImageArrays:
        labels = rng.integers(0, num_classes, size=n)
        yy, xx = np.mgrid[0:size, 0:size] / size
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        a, f = angles[labels][:, None, None], freqs[labels][:, None, None]
        stripes = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + phase)
        img = colours[labels][:, None, None, :] + 0.25 * stripes[..., None]
        img += rng.normal(0, 0.08, size=img.shape)
        return ImageArrays((np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64))

    return Raw([f"class{i}" for i in range(num_classes)], make(train_size), make(test_size))


# ---------------------------------------------------------------- CIFAR (torchvision's readers)


def _cifar(root: Path, download: bool, hundred: bool) -> Raw:
    from torchvision import datasets

    official = datasets.CIFAR100 if hundred else datasets.CIFAR10
    name = "cifar100" if hundred else "cifar10"

    # torchvision checks every batch file's md5 on each load; existence is enough to read it
    # (downloads still verify the archive's md5), and it lets tests write files in the real format.
    class Lenient(official):  # type: ignore[misc, valid-type]
        train_list = [[f, None] for f, _ in official.train_list]
        test_list = [[f, None] for f, _ in official.test_list]
        meta = {**official.meta, "md5": None}

    folder = root / official.base_folder
    files = [f for f, _ in official.train_list + official.test_list] + [official.meta["filename"]]

    def present() -> bool:
        return all((folder / f).is_file() for f in files)

    if not present() and download:
        _try_download(lambda: official(str(root), train=True, download=True), name, folder)
    if not present():
        raise DatasetUnavailableError(
            f"{name} is not in {folder}; run `bench fetch {name}` on a machine with internet, "
            f"or copy {official.filename} into {root} and unpack it there"
        )
    train, test = Lenient(str(root), train=True), Lenient(str(root), train=False)
    return Raw(
        list(train.classes),
        ImageArrays(np.ascontiguousarray(train.data), np.asarray(train.targets, dtype=np.int64)),
        ImageArrays(np.ascontiguousarray(test.data), np.asarray(test.targets, dtype=np.int64)),
    )


def _try_download(fetch: Callable[[], object], name: str, folder: Path) -> None:
    """Run a torchvision download with a short socket timeout; offline it fails fast, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        fetch()
    except (OSError, RuntimeError) as exc:
        raise DatasetUnavailableError(
            f"{name} is not in {folder} and the download failed ({exc.__class__.__name__}: {str(exc)[:80]}); "
            f"run `bench fetch {name}` on a machine with internet and copy {folder} here"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


CINIC_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"


def _download_cinic(folder: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    _try_download(lambda: download_and_extract_archive(CINIC_URL, str(folder)), "cinic10", folder)


# ---------------------------------------------------------------- image folders


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[str], np.ndarray]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes or found
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}) if (folder / cls).is_dir() else []
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def read_image_folder(folder: Path, cache_root: Path) -> Raw:
    """Read train/ test/ (valid/) class folders; decode once into a cached uint8 array when it fits."""
    classes, train_paths, train_labels = _list_split(folder / "train", None)
    _, test_paths, test_labels = _list_split(folder / "test", classes)
    val_files = _list_split(folder / "valid", classes) if (folder / "valid").is_dir() else None
    if not train_paths:
        raise DatasetUnavailableError(f"{folder}/train has no images in class folders; check the dataset path")
    splits = {"train": (train_paths, train_labels), "test": (test_paths, test_labels)}
    if val_files:
        splits["valid"] = val_files[1:]
    caches = {k: _cache_file(p, cache_root) for k, (p, _) in splits.items()}
    if all(c.is_file() for c in caches.values()):  # decoded before: no image is opened again
        arrays = {k: ImageArrays(np.load(caches[k]), y) for k, (_, y) in splits.items()}
        return Raw(classes, arrays["train"], arrays["test"], arrays.get("valid"))
    from PIL import Image

    with Image.open(train_paths[0]) as first:
        width, height = first.size
    total = sum(len(p) for p, _ in splits.values()) * width * height * 3
    if total > int(os.environ.get("BENCH_RESIDENT_MAX_BYTES", RESIDENT_MAX_BYTES)):
        arrays = {k: FileList(p, y) for k, (p, y) in splits.items()}
    else:
        arrays = {k: ImageArrays(_decode(p, (height, width), caches[k]), y) for k, (p, y) in splits.items()}
    return Raw(classes, arrays["train"], arrays["test"], arrays.get("valid"))


def _cache_file(paths: list[str], cache_root: Path) -> Path:
    """Where a split's decoded array is kept, keyed by its files' names, sizes and mtimes."""
    key = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_root / "bench-cache" / f"imagefolder-{key.hexdigest()[:16]}.npy"


def _decode(paths: list[str], hw: tuple[int, int], cache: Path) -> np.ndarray:
    """Decode every image once into one uint8 array and keep it, so later runs skip decoding."""
    from PIL import Image

    out = np.empty((len(paths), *hw, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            img = img.convert("RGB")
            if img.size != (hw[1], hw[0]):
                img = img.resize((hw[1], hw[0]), Image.BILINEAR)
            out[i] = np.asarray(img)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, cache)
    return out
