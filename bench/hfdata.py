"""Image-classification datasets of the Hugging Face Hub (`hf:OWNER/NAME`, `hf:OWNER/NAME:CONFIG`) and folders
written by `save_to_disk` (`hf:/path/to/folder`), read with the `datasets` library (the `bench[hf]` extra).

A Hub dataset comes from the `datasets` cache (HF_DATASETS_CACHE, else HF_HOME/datasets), with no network at all
when the cache holds it, downloaded otherwise (unless bench is offline: --no-download, HF_HUB_OFFLINE=1 or
HF_DATASETS_OFFLINE=1). Its images then take the image folders' path (`bench.imagefolder.store_resident`):
decoded once at the stored side into a uint8 array cached under the data root, keyed by the splits' fingerprints,
the image column, the side and the stored recipe; unreadable images are named (`hf:NAME train[i]`) and refused,
or skipped with BENCH_SKIP_BAD_IMAGES=1. The columns are found by their features (the one `Image`, the one
`ClassLabel`) or named by the suite (`image_column`, `label_column`); class names are the ClassLabel's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import imagefolder
from bench.errors import BenchError, DatasetUnavailableError, SuiteError, UnknownDatasetError, close_matches
from bench.imagefolder import CAP_SAMPLE, Manifest, SplitImages, decode_images, stored_side
from bench.splits import Raw

# The dataset's own splits, by the names the Hub uses for them: train, validation (else bench cuts one from
# train with val_fraction) and test.
SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "val"), "test": ("test",)}
CHUNK = 2048  # rows whose encoded images are held at once while decoding: a bound on memory, not a speed knob
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
CONFIG_NAME = re.compile(r"[\w.-]+")
TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HfSource:
    """What follows `hf:`: a Hub dataset (name, maybe a config) or a folder written by `save_to_disk`."""

    text: str
    name: str | None = None
    config: str | None = None
    folder: Path | None = None

    @property
    def label(self) -> str:
        return f"hf:{self.text}"


def parse(arg: str) -> HfSource:
    """`OWNER/NAME`, `OWNER/NAME:CONFIG` or a folder path (starting with /, . or ~); an error names the forms."""
    if arg.startswith(("/", ".", "~")):
        return HfSource(arg, folder=Path(arg).expanduser())
    name, colon, config = arg.partition(":")
    if not HUB_NAME.fullmatch(name) or (colon and not CONFIG_NAME.fullmatch(config)):
        raise UnknownDatasetError(
            f"hf:{arg} is not a dataset bench can read; write hf:OWNER/NAME or hf:OWNER/NAME:CONFIG for the Hub, "
            "or hf:/path/to/folder for one saved with save_to_disk")
    return HfSource(arg, name=name, config=config or None)


def read(arg: str, cache_root: Path, download: bool, requested_side: int | None, *,
         image_column: str | None = None, label_column: str | None = None) -> Raw:
    """The dataset's splits as stored uint8 arrays at the stored side (`stored_side`: the suite's choice capped
    by the images' typical short side), with its class names."""
    from bench.imagefolder import cache_dir, load_manifest, store_resident

    source = parse(arg)
    found = _splits(source, _open(source, download))
    image, label = find_columns(found["train"].features, source, image_column, label_column)
    classes = list(found["train"].features[label].names)
    splits = {k: _split_images(source, k, ds, image, _labels(source, k, ds, label, len(classes)))
              for k, ds in found.items()}
    folder = cache_dir(cache_root)
    manifest_file = folder / f"hf-{_key(found, image)}.json"
    manifest = load_manifest(manifest_file) or Manifest(cap=_typical_side(source, found["train"], image))
    side = stored_side(requested_side, manifest.cap)
    _check_fits(source, sum(len(s.names) for s in splits.values()), side)
    caches = {k: folder / f"hf-{_key(found, image, f'{imagefolder.STORED_RECIPE}|{side}')}-{k}.npy" for k in splits}
    arrays = store_resident(splits, side, caches, manifest, manifest_file, source.label, unit="images")
    return Raw(classes, arrays["train"], arrays["test"], arrays.get("valid"), stored_resolution=side)


def fetch(arg: str) -> str:
    """Download a Hub dataset into the `datasets` cache (or check a saved folder) for offline use; say where it is
    and what bench will read from it."""
    source = parse(arg)
    found = _splits(source, _open(source, download=True))
    sizes = ", ".join(f"{k} {len(ds)}" for k, ds in found.items())
    return f"ready in {source.folder or hf_cache_dir()} ({sizes} images)"


def sizes(arg: str, label_column: str | None = None) -> tuple[int, int | None, int, int] | None:
    """(train, own validation or None, test, classes) for cost estimates, without decoding an image or any
    download: None when the dataset is not at hand or its label column is not plain."""
    source = parse(arg)
    try:
        found = _splits(source, _open(source, download=False))
        _, label = find_columns(found["train"].features, source, label_column=label_column)
    except BenchError:
        return None
    valid = len(found["valid"]) if "valid" in found else None
    return len(found["train"]), valid, len(found["test"]), len(found["train"].features[label].names)


# ---------------------------------------------------------------- opening: the cache, the Hub, a saved folder


def hf_cache_dir() -> Path:
    """Where the `datasets` library keeps Hub datasets, read from the environment now (the library reads it
    once, at import, so a cache chosen later, by a test or a cell's environment, would be missed)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _offline_env() -> str | None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in TRUE:
            return f"{name}=1"
    return None


def _library():
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError("hf: datasets need the `datasets` library, which is not installed; "
                                      "install bench with it: pip install 'bench[hf]'") from None
    datasets.disable_progress_bars()  # one bar per split and shard would bury a cell's log
    datasets.logging.set_verbosity_error()  # "using the latest cached version" on every offline load
    return datasets


def _open(source: HfSource, download: bool):
    datasets = _library()
    if source.folder is None:
        return _from_hub(datasets, source, download)
    if not source.folder.is_dir():
        raise DatasetUnavailableError(f"{source.label}: {source.folder} does not exist; save the dataset there "
                                      "with DatasetDict.save_to_disk, or fix the path")
    try:
        found = datasets.load_from_disk(str(source.folder))
    except FileNotFoundError:
        raise DatasetUnavailableError(f"{source.label}: {source.folder} holds no dataset written by save_to_disk; "
                                      "fix the path or save a DatasetDict there") from None
    if not isinstance(found, datasets.DatasetDict):
        raise SuiteError(f"{source.label} is one Dataset without splits; save a DatasetDict with train and test "
                         "(and maybe validation) splits instead")
    return found


def _from_hub(datasets, source: HfSource, download: bool):
    """The cache first, offline (no request at all when it holds the dataset); the Hub when allowed."""
    cache = hf_cache_dir()
    with contextlib.suppress(OSError, ValueError):  # not cached (ConnectionError), or not this config (ValueError)
        with _hub_offline(datasets):
            return datasets.load_dataset(source.name, source.config, cache_dir=str(cache))
    offline = "--no-download" if not download else _offline_env()
    if offline is None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return datasets.load_dataset(source.name, source.config, cache_dir=str(cache))
        except (OSError, ValueError, RuntimeError, HfHubHTTPError) as exc:
            why = " ".join(str(exc).split())[:120]
            raise DatasetUnavailableError(
                f"{source.label} is not in the datasets cache {cache} and could not be downloaded "
                f"({exc.__class__.__name__}: {why}); check the name, or run `bench fetch {source.label}` on a "
                f"machine with internet and copy its cache here") from None
    raise DatasetUnavailableError(
        f"{source.label} is not in the datasets cache {cache} and bench is offline ({offline}); run "
        f"`bench fetch {source.label}` on a machine with internet and copy its cache to {cache} "
        "(or point HF_DATASETS_CACHE at a copy)")


@contextlib.contextmanager
def _hub_offline(datasets):
    """The library's offline switch, for one load: it is read from the environment at import only, so setting
    the variable now would change nothing. Offline, `load_dataset` goes straight to its cache."""
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _splits(source: HfSource, found) -> dict:
    """The dataset's train, validation (when it has one) and test splits, under bench's names."""
    picked = {}
    for ours, theirs in SPLIT_NAMES.items():
        name = next((n for n in theirs if n in found), None)
        if name is not None:
            picked[ours] = found[name]
    for needed in ("train", "test"):
        if needed not in picked:
            raise SuiteError(f"{source.label} has no {needed} split (its splits: {', '.join(found) or 'none'}); "
                             "bench needs train and test: save a DatasetDict with both and use hf:/path/to/it")
    return picked


# ---------------------------------------------------------------- columns and labels


def find_columns(features, source: HfSource, image_column: str | None = None,
                 label_column: str | None = None) -> tuple[str, str]:
    """The image column (an `Image` feature) and the label column (a `ClassLabel`): the suite's, checked, or the
    only one of its kind."""
    from datasets import ClassLabel, Image

    return (_column(features, Image, image_column, "image", source),
            _column(features, ClassLabel, label_column, "label", source))


def _column(features, kind: type, named: str | None, role: str, source: HfSource) -> str:
    typed = [name for name, feature in features.items() if isinstance(feature, kind)]
    listed = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    if named is not None:
        if named not in features:
            raise SuiteError(f"{source.label}: {role}_column {named!r} is not one of its columns{close_matches(named, features)} "
                             f"(they are {listed}); fix the name")
        if not isinstance(features[named], kind):
            raise SuiteError(f"{source.label}: {role}_column {named!r} holds {type(features[named]).__name__} values, "
                             f"not {kind.__name__}; name one of: {', '.join(typed) or f'none (its columns: {listed})'}")
        return named
    if len(typed) == 1:
        return typed[0]
    if not typed:
        raise SuiteError(f"{source.label} has no {kind.__name__} column (its columns: {listed}); name the "
                         f"{role}s' column in the suite with {role}_column: NAME")
    raise SuiteError(f"{source.label} has {len(typed)} {kind.__name__} columns ({', '.join(typed)}); choose one "
                     f"in the suite with {role}_column: NAME")


def _labels(source: HfSource, split: str, ds, label: str, classes: int) -> np.ndarray:
    labels = np.asarray(ds.with_format("numpy")[label], dtype=np.int64)
    unlabelled = int(((labels < 0) | (labels >= classes)).sum())
    if unlabelled:
        raise SuiteError(f"{source.label}: {unlabelled} of the {len(labels)} images of its {split} split have no "
                         f"class ({label} is -1 or out of range); bench needs every train and test image labelled: "
                         "choose a dataset or config whose splits are, or save one with save_to_disk")
    return labels


# ---------------------------------------------------------------- images


def _encoded_column(ds, image: str):
    """The image column alone, undecoded: each row {'bytes', 'path'}, for bench's own decoding."""
    from datasets import Image

    return ds.select_columns([image]).cast_column(image, Image(decode=False))


def _encoded(row: dict) -> str | bytes:
    # Embedded bytes (the Hub's Parquet, save_to_disk); a path where the dataset points at files instead. A row
    # with neither decodes as an unreadable image, named like any other.
    return row.get("bytes") or row.get("path") or b""


def _split_images(source: HfSource, split: str, ds, image: str, labels: np.ndarray) -> SplitImages:
    column = _encoded_column(ds, image)
    names = [f"{source.label} {split}[{i}]" for i in range(len(ds))]

    def decode(side: int, threads: int) -> tuple[np.ndarray, dict[str, str]]:
        out = np.zeros((len(names), side, side, 3), dtype=np.uint8)
        bad: dict[str, str] = {}
        for start in range(0, len(names), CHUNK):
            rows = [_encoded(r) for r in column[start:start + CHUNK][image]]
            out[start:start + len(rows)], found = decode_images(rows, side, threads, names[start:start + len(rows)])
            bad.update(found)
        return out, bad

    return SplitImages(names, labels, decode)


def _typical_side(source: HfSource, train, image: str) -> int:
    """The train split's typical short side, from the headers of up to CAP_SAMPLE images spread over it."""
    pick = np.linspace(0, len(train) - 1, min(CAP_SAMPLE, len(train))).astype(int).tolist()
    rows = [_encoded(r) for r in _encoded_column(train, image)[pick][image]]
    return imagefolder.typical_short_side(rows, source.label, first=f"{source.label} train[0]")


def _key(found: dict, image: str, extra: str = "") -> str:
    """A hash of the splits' fingerprints (the `datasets` library's own content key) and the image column."""
    key = hashlib.sha256(f"{image}|{extra}".encode())
    for split, ds in sorted(found.items()):
        key.update(f"{split}={ds._fingerprint}\n".encode())
    return key.hexdigest()[:16]


def _check_fits(source: HfSource, count: int, side: int) -> None:
    limit = int(os.environ.get("BENCH_RESIDENT_MAX_BYTES", imagefolder.RESIDENT_MAX_BYTES))
    stored = count * side * side * 3
    if stored > limit:
        raise SuiteError(f"{source.label} stored at {side} px takes {stored / 2**30:.1f} GiB, over "
                         f"BENCH_RESIDENT_MAX_BYTES ({limit / 2**30:.1f} GiB), and hf: datasets are kept resident; "
                         "lower source_resolution, or raise BENCH_RESIDENT_MAX_BYTES if the device holds it")
