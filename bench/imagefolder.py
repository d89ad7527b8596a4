"""Image folders (train/ test/ [valid/], one sub-folder per class), stored once at one square side; the
storing itself (decode once, cache, bad images) is shared with Hugging Face datasets (`bench/hfdata.py`).

Every image becomes the same S x S RGB picture whichever loader reads it: converted to RGB, resized so its
short side is S, centre-cropped to S x S (torchvision's `Resize(S)` + `CenterCrop(S)` on PIL images, the
evaluation recipe). The resident path decodes the whole folder once, in a thread pool, into a cached uint8
array; the streaming path (`bench/streaming.py`) calls `stored_image` per file in its DataLoader workers.

S is the suite's choice (`stored_resolution`: the largest resolution any cell asks for, or an explicit
`source_resolution`) capped by the images' own size; see `stored_side`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.atomic import atomic_write
from bench.errors import BadImageError, DatasetUnavailableError
from bench.splits import FileList, ImageArrays, Raw

# Part of every array cache's key: change it whenever `stored_image` would give different pixels.
STORED_RECIPE = "rgb-convert|short-side-pil-bilinear|centre-crop|v1"
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Above this many bytes of stored uint8 pixels (BENCH_RESIDENT_MAX_BYTES) a folder streams from disk instead
# of living on the device: 4 GiB holds ImageNet-64 or a few CINIC-10s.
RESIDENT_MAX_BYTES = 4 << 30
CAP_SAMPLE = 1000  # headers read to find the images' typical size: enough for a stable median, fast on any folder
SMALL_SIDE = 64  # images this small (typical short side) decode on one thread; see `decode_threads`
SKIP_ENV = "BENCH_SKIP_BAD_IMAGES"


@dataclass
class Listing:
    """The folder's image files per split ('train', 'test', maybe 'valid') and the class names."""

    classes: list[str]
    splits: dict[str, tuple[list[str], np.ndarray]]

    def all_paths(self) -> list[str]:
        return [p for paths, _ in self.splits.values() for p in paths]


@dataclass
class Manifest:
    """What is known about a folder's contents, cached under its content key: the images' typical short
    side (the cap on S) and the files that cannot be read, once every file has been decoded (`checked`)."""

    cap: int
    bad: dict[str, str] = field(default_factory=dict)  # path -> why it cannot be read
    checked: bool = False


@dataclass
class SplitImages:
    """A split's images as `store_resident` takes them: a name per image (its path; `hf:NAME train[i]` for a
    dataset's row) for messages and the manifest, their labels, and how to decode them all at a side (side,
    threads) -> ((N, side, side, 3) uint8, unreadable name -> why)."""

    names: list[str]
    labels: np.ndarray
    decode: Callable[[int, int], tuple[np.ndarray, dict[str, str]]]


def read_image_folder(folder: Path, cache_root: Path, stored_resolution: int | None = None) -> Raw:
    """Read train/ test/ (valid/) class folders at the stored side; decoded once into cached uint8 arrays
    when they fit under BENCH_RESIDENT_MAX_BYTES, file lists for the streaming loader otherwise."""
    listing = list_folder(folder)
    paths = listing.all_paths()
    manifest_file = cache_dir(cache_root) / f"imagefolder-{_files_key(paths)}.json"
    manifest = load_manifest(manifest_file) or Manifest(cap=typical_short_side(paths, str(folder)))
    side = stored_side(stored_resolution, manifest.cap)
    stored_bytes = (len(paths) - len(manifest.bad)) * side * side * 3
    if stored_bytes > int(os.environ.get("BENCH_RESIDENT_MAX_BYTES", RESIDENT_MAX_BYTES)):
        arrays = _streaming(listing, side, manifest, manifest_file, folder)
    else:
        arrays = _resident(listing, side, manifest, manifest_file, cache_root, folder)
    return Raw(listing.classes, arrays["train"], arrays["test"], arrays.get("valid"), stored_resolution=side)


def stored_side(requested: int | None, cap: int) -> int:
    """The side images are stored at: the suite's choice, never above the folder's typical short side (storing
    small images blown up costs memory and adds nothing: the loaders resize per batch); the cap when unasked."""
    return cap if requested is None else min(requested, cap)


def stored_image(path: str, side: int) -> np.ndarray:
    """One image as stored: (side, side, 3) uint8, RGB, short side resized to `side`, centre-cropped."""
    try:
        return _decode(path, side)
    except _PIL_ERRORS as exc:
        raise BadImageError(_bad_message({path: _reason(exc)}, Path(path).parent)) from None


def _decode(source: str | bytes, side: int) -> np.ndarray:
    """One image file, or its encoded bytes (a Hugging Face dataset's row), as stored."""
    from PIL import Image

    with Image.open(_file(source)) as img:
        if img.mode.startswith("I;16"):
            # PIL clips 16-bit greyscale to 0-255 on conversion (nearly every pixel white): keep the top 8 bits.
            img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L")
        # As torchvision's ImageFolder loader: greyscale and palette expand to RGB, alpha is dropped
        # (transparent pixels keep the colour stored under them). This decodes, so a truncated file fails here.
        rgb = img.convert("RGB")
    return np.asarray(_resize_crop(rgb, side))


def _file(source: str | bytes):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def _resize_crop(img, side: int):
    """torchvision's Resize(side) + CenterCrop(side) on a PIL image, to the pixel: the short side becomes
    `side`, the long one int(side * long / short), by PIL's bilinear filter (antialiased: its support grows
    with the reduction); then the centre window, offsets rounded as torchvision rounds them."""
    from PIL import Image

    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != side:
        new_long = int(side * long / short)
        img = img.resize((side, new_long) if w <= h else (new_long, side), Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # What PIL raises for a file it cannot decode: OSError (truncated data; UnidentifiedImageError for a
    # file that is no image), SyntaxError and ValueError (malformed headers), EOFError, a decompression bomb.
    return OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError


_PIL_ERRORS = _pil_errors()


def _reason(exc: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can read"
    return f"{exc.__class__.__name__}: {str(exc)[:100]}"


# ---------------------------------------------------------------- listing and cache keys


def list_folder(folder: Path) -> Listing:
    """The image files of train/, test/ and valid/ (when present), sorted, with class labels from train/."""
    classes, train_paths, train_labels = _list_split(folder / "train", None)
    if not train_paths:
        raise DatasetUnavailableError(f"{folder}/train has no images in class folders; check the dataset path")
    splits = {"train": (train_paths, train_labels), "test": _list_split(folder / "test", classes)[1:]}
    if (folder / "valid").is_dir():
        splits["valid"] = _list_split(folder / "valid", classes)[1:]
    return Listing(classes, splits)


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[str], np.ndarray]:
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in EXTENSIONS) if (folder / cls).is_dir() else []
        paths += [str(p) for p in found]
        labels += [label] * len(found)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def cache_dir(cache_root: Path) -> Path:
    return cache_root / "bench-cache"


def _files_key(paths: list[str], extra: str = "") -> str:
    """A hash of the files' paths, sizes and mtimes: a file added, removed or replaced changes it."""
    key = hashlib.sha256(extra.encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()[:16]


def cache_file(paths: list[str], cache_root: Path, side: int) -> Path:
    """Where a split's stored array is kept: keyed by its files, the stored side and the stored recipe."""
    return cache_dir(cache_root) / f"imagefolder-{_files_key(paths, f'{STORED_RECIPE}|{side}')}.npy"


def load_manifest(path: Path) -> Manifest | None:
    if not path.is_file():
        return None
    return Manifest(**json.loads(path.read_text()))


def save_manifest(path: Path, manifest: Manifest) -> None:
    atomic_write(path, lambda out: out.write(json.dumps(manifest.__dict__).encode()), sync=False)


def typical_short_side(sources: Sequence[str | bytes], where: str, first: str | None = None) -> int:
    """The median short side of up to CAP_SAMPLE images (files, or encoded bytes) spread evenly over the
    listing (headers only). The median, not the largest: one big outlier must not blow every image up, nor
    one thumbnail shrink them all. Unreadable images are left out here; decoding names them."""
    from PIL import Image

    sample = sources[::max(1, len(sources) // CAP_SAMPLE)][:CAP_SAMPLE]
    shorts = []
    for source in sample:
        try:
            with Image.open(_file(source)) as img:
                shorts.append(min(img.size))
        except _PIL_ERRORS:
            continue
    if not shorts:
        raise BadImageError(f"none of the {len(sample)} images sampled from {where} is one PIL can read "
                            f"(the first: {first or sources[0]}); check that it holds images")
    return int(sorted(shorts)[(len(shorts) - 1) // 2])


# ---------------------------------------------------------------- decoding, bad files


def decode_threads(typical_side: int | None = None) -> int:
    """Threads for decoding: every core this process may use (PIL releases the GIL while it decodes and
    resizes), but one for images of SMALL_SIDE px or less, whose decoding is mostly PIL's header parsing in
    Python, under the GIL: a second thread only contends for it (benchmarks/RESULTS.md, 2 cores: 0.81x at 32 px
    and 0.92x at 64 px, against 1.79x at 96 px and 1.85x for 640 x 480 photos stored at 224)."""
    if typical_side is not None and typical_side <= SMALL_SIDE:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_images(paths: Sequence[str | bytes], side: int, threads: int | None = None,
                  names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """Every image (a file, or encoded bytes) as stored, into one (N, side, side, 3) uint8 array, in a thread
    pool; the unreadable ones (path, or its name in `names` -> why) come back beside it, their rows left at zero."""
    out = np.zeros((len(paths), side, side, 3), dtype=np.uint8)
    bad: dict[str, str] = {}
    names = paths if names is None else names

    def chunk(span: range) -> None:
        for i in span:
            try:
                out[i] = _decode(paths[i], side)
            except _PIL_ERRORS as exc:
                bad[names[i]] = _reason(exc)

    _pool_run(chunk, len(paths), threads)
    return out, bad


def find_bad_images(paths: list[str], side: int, threads: int | None = None) -> dict[str, str]:
    """The files that cannot be decoded (path -> why), read once for the streaming path, which stores nothing.
    JPEGs decode at a reduced scale (PIL's draft mode), enough to reach a truncation, several times faster."""
    from PIL import Image

    bad: dict[str, str] = {}

    def chunk(span: range) -> None:
        for p in (paths[i] for i in span):
            try:
                with Image.open(p) as img:
                    img.draft("RGB", (side, side))
                    img.load()
            except _PIL_ERRORS as exc:
                bad[p] = _reason(exc)

    _pool_run(chunk, len(paths), threads)
    return dict(sorted(bad.items()))


def _pool_run(work, count: int, threads: int | None) -> None:
    """Run `work` over index ranges covering `count` files, in a pool of threads: about four ranges per thread,
    of at most 256 files. A range per file would cost more than decoding CIFAR's tiny JPEGs; fixed ranges of 256
    would hand a folder of a few hundred big images to one or two threads."""
    threads = threads or decode_threads()
    size = max(1, min(256, -(-count // (4 * threads))))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, (range(i, min(i + size, count)) for i in range(0, count, size))):
            pass  # re-raises a worker's unexpected exception here


def _skip_bad() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _allow_bad(bad: dict[str, str], folder: Path | str, unit: str = "files") -> None:
    """Raise when some images cannot be read, unless BENCH_SKIP_BAD_IMAGES is set: then say on stderr how
    many are left out and which, every time the folder (or dataset) is read (runner and each cell's log)."""
    if not bad:
        return
    if not _skip_bad():
        raise BadImageError(_bad_message(bad, folder, unit))
    what = "image file(s)" if unit == "files" else "image(s)"
    print(f"warning: {folder}: skipped {len(bad)} unreadable {what} ({SKIP_ENV}=1): {_first_few(bad)}",
          file=sys.stderr, flush=True)


def _bad_message(bad: dict[str, str], folder: Path | str, unit: str = "files") -> str:
    if len(bad) == 1:
        return (f"{_first_few(bad)} cannot be decoded; replace or delete it, or set {SKIP_ENV}=1 to skip "
                f"unreadable {unit}")
    return (f"{len(bad)} {unit} in {folder} cannot be decoded: {_first_few(bad)}; replace or delete them, "
            f"or set {SKIP_ENV}=1 to skip unreadable {unit}")


def _first_few(bad: dict[str, str], few: int = 3) -> str:
    """'a.jpg (why), b.jpg (why) and 4 more': enough to find the files, short enough for one line."""
    named = ", ".join(f"{p} ({why})" for p, why in list(bad.items())[:few])
    return named + (f" and {len(bad) - few} more" if len(bad) > few else "")


def _without(paths: list[str], labels: np.ndarray, bad: dict[str, str]) -> tuple[list[str], np.ndarray]:
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return [paths[i] for i in keep], labels[keep]


def _streaming(listing: Listing, side: int, manifest: Manifest, manifest_file: Path,
               folder: Path) -> dict[str, FileList]:
    """Each split as a file list; every file decoded once first (then never again: the manifest keeps the
    verdict), so an unreadable file is named now, not by a DataLoader worker in the middle of an epoch."""
    if not manifest.checked:
        bad = find_bad_images(listing.all_paths(), side, decode_threads(manifest.cap))
        manifest.bad, manifest.checked = bad, True
        save_manifest(manifest_file, manifest)
    _allow_bad(manifest.bad, folder)
    return {k: FileList(*_without(p, y, manifest.bad), stored_resolution=side) for k, (p, y) in listing.splits.items()}


def _resident(listing: Listing, side: int, manifest: Manifest, manifest_file: Path, cache_root: Path,
              folder: Path) -> dict[str, ImageArrays]:
    splits = {k: SplitImages(p, y, functools.partial(decode_images, p)) for k, (p, y) in listing.splits.items()}
    caches = {k: cache_file(p, cache_root, side) for k, (p, _) in listing.splits.items()}
    return store_resident(splits, side, caches, manifest, manifest_file, str(folder))


def store_resident(splits: dict[str, SplitImages], side: int, caches: dict[str, Path], manifest: Manifest,
                   manifest_file: Path, where: str, unit: str = "files") -> dict[str, ImageArrays]:
    """Each split as a stored uint8 array: from its cache when decoded before (no image is opened again),
    else decoded in one pass over every split, bad images recorded in the manifest before anything is kept."""
    if manifest.checked and all(c.is_file() for c in caches.values()):
        _allow_bad(manifest.bad, where, unit)
        return {k: ImageArrays(np.load(caches[k]), _without(s.names, s.labels, manifest.bad)[1])
                for k, s in splits.items()}
    threads = decode_threads(manifest.cap)
    decoded = {k: s.decode(side, threads) for k, s in splits.items()}
    manifest.bad = dict(sorted(b for _, bad in decoded.values() for b in bad.items()))
    manifest.checked = True
    save_manifest(manifest_file, manifest)
    _allow_bad(manifest.bad, where, unit)
    arrays = {}
    for k, split in splits.items():
        images = decoded[k][0]
        keep = np.asarray([name not in manifest.bad for name in split.names], dtype=bool)
        images = images if keep.all() else images[keep]
        atomic_write(caches[k], lambda out, a=images: np.save(out, a), sync=False)  # a cache: rebuilt if lost
        arrays[k] = ImageArrays(images, split.labels[keep])
    return arrays
