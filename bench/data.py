"""Datasets by name and reproducible splits: everything up to the uint8 arrays (or, for image folders too
big to keep resident, the file lists) that the loaders batch from. Image folders are read and stored by
`bench/imagefolder.py`, Hugging Face datasets (`hf:`) by `bench/hfdata.py`.

Batches come from `bench/loader.py` (resident on the device) and `bench/streaming.py` (DataLoader).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import DatasetUnavailableError, UnknownDatasetError, close_matches
from bench.imagefolder import read_image_folder
from bench.splits import FileList, ImageArrays, Raw, Splits  # noqa: F401 - FileList: importers take it from here too

SPLIT_SEED = 0  # the validation split and subsets are the same for every cell, so cells compare


def default_data_root() -> Path:
    return Path(os.environ.get("BENCH_DATA", Path.home() / ".cache" / "bench" / "data"))


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Request:
    """What a reader is asked for: the argument after the colon, the data root, whether it may download, the
    stored side (image folders and hf: datasets; the others come at their own size) and, for hf: datasets, the
    columns the suite names (None: found by their features)."""

    arg: str
    root: Path
    download: bool = True
    side: int | None = None
    image_column: str | None = None
    label_column: str | None = None


def _synthetic(_want: Request) -> Raw:
    return synthetic_raw()


def _cifar10(want: Request) -> Raw:
    return _cifar(want.root, want.download, hundred=False)


def _cifar100(want: Request) -> Raw:
    return _cifar(want.root, want.download, hundred=True)


def _cinic10(want: Request) -> Raw:

    folder = want.root / "cinic10"
    if not (folder / "train").is_dir() and want.download:
        _download_cinic(folder)
    if not (folder / "train").is_dir():
        raise DatasetUnavailableError(
            f"cinic10 is not in {folder} and could not be downloaded; run `bench fetch cinic10` on a machine "
            f"with internet, or unpack CINIC-10.tar.gz into {folder}"
        )
    return read_image_folder(folder, want.root, want.side)


def _imagefolder(want: Request) -> Raw:

    folder = Path(want.arg).expanduser()
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DatasetUnavailableError(
            f"imagefolder:{want.arg} needs {folder}/train and {folder}/test with one sub-folder per class; "
            "check the path or create that layout"
        )
    return read_image_folder(folder, want.root, want.side)


def _hf(want: Request) -> Raw:
    from bench import hfdata

    return hfdata.read(want.arg, want.root, want.download, want.side, image_column=want.image_column,
                       label_column=want.label_column)


DATASETS: dict[str, Callable[[Request], Raw]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "cinic10": _cinic10,
    "imagefolder": _imagefolder,
    "hf": _hf,
}


TAKES_ARGUMENT = ("imagefolder", "hf")  # written NAME:ARGUMENT (a folder; a Hub name or a folder)


def dataset_pattern() -> str:
    """A regular expression for the dataset names bench reads (the suite schema's): the registry's plain names,
    and NAME:ARGUMENT for those that take one."""
    plain = "|".join(re.escape(k) for k in DATASETS if k not in TAKES_ARGUMENT)
    return f"^({plain}|({'|'.join(TAKES_ARGUMENT)}):.+)$"


def parse_name(dataset: str) -> tuple[str, str]:
    """Split 'imagefolder:/some/path' into ('imagefolder', '/some/path'); check the name is registered (and an
    hf: dataset's name or path is well formed)."""
    kind, _, arg = dataset.partition(":")
    if kind not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {dataset!r}{close_matches(kind, DATASETS)}; choose one of {', '.join(DATASETS)}")
    if kind == "imagefolder" and not arg:
        raise UnknownDatasetError("imagefolder needs a path: write `dataset: imagefolder:/path/to/folder`")
    if kind == "hf":
        from bench import hfdata

        hfdata.parse(arg)
    return kind, arg


def _request(dataset: str, data_root: Path | None, **options) -> tuple[str, Request]:
    kind, arg = parse_name(dataset)
    return kind, Request(arg, Path(data_root or default_data_root()), **options)


def prepare(dataset: str, data_root: Path | None = None, *, download: bool = True,
            stored_resolution: int | None = None, image_column: str | None = None,
            label_column: str | None = None) -> None:
    """Make sure a dataset is on disk (downloading it, decoding an image folder or hf: dataset into its cache at
    `stored_resolution`, capped by the images' own size) once, before any cell starts; raises
    DatasetUnavailableError with the fix when it cannot be had, BadImageError naming an unreadable file."""
    kind, want = _request(dataset, data_root, download=download, side=stored_resolution,
                          image_column=image_column, label_column=label_column)
    DATASETS[kind](want)


def fetch(dataset: str, data_root: Path | None = None) -> str:
    """Download a dataset for offline use (`bench fetch`); say where it is. An hf: dataset goes to the `datasets`
    cache, undecoded: the run decodes it at the side its suite asks for."""
    kind, arg = parse_name(dataset)
    if kind == "hf":
        from bench import hfdata

        return hfdata.fetch(arg)
    load_splits(dataset, data_root, download=True)
    return f"ready under {data_root or default_data_root()}"


def load_splits(
    dataset: str,
    data_root: Path | None = None,
    *,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = True,
    stored_resolution: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Splits:
    """Load a dataset by name and cut it: validation carved from train with a fixed seed (unless the dataset has
    its own), optional subsets. Image folders and hf: datasets come at `stored_resolution` (see `prepare`)."""
    kind, want = _request(dataset, data_root, download=download, side=stored_resolution,
                          image_column=image_column, label_column=label_column)
    raw = DATASETS[kind](want)
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
    return Splits(dataset, raw.classes, train, val, test, loader, raw.stored_resolution)


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
