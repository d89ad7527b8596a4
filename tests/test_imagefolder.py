"""Image folders of any size and shape: one stored side, short-side resize + centre crop, RGB, bad files,
the cache key, and the resident and streaming paths giving the same tensor."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data, imagefolder
from bench.errors import BadImageError
from bench.loader import DeviceLoader
from bench.recipe import InputRecipe
from bench.streaming import StreamingLoader

CPU = torch.device("cpu")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _folder(root: Path, sizes: list[tuple[int, int]], classes=("a", "b")) -> Path:
    """train/ and test/ with one noise image of each (width, height) per class, as PNG (lossless)."""
    for s, split in enumerate(("train", "test")):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                _noise(w, h, seed=100 * s + 10 * k + i).save(root / split / cls / f"{i}.png")
    return root


def _load(root: Path, cache: Path, side: int | None = None):
    return data.load_splits(f"imagefolder:{root}", cache, val_fraction=0.0, stored_resolution=side)


# ------------------------------------------------------------------ the stored image


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (37, 91), (91, 37), (40, 40), (17, 23)])
@pytest.mark.parametrize("side", [16, 32, 57])
def test_stored_image_is_torchvisions_resize_and_centre_crop(tmp_path, size, side):
    from torchvision.transforms import v2

    path = tmp_path / "x.png"
    _noise(*size).save(path)
    expected = np.asarray(v2.CenterCrop(side)(v2.Resize(side)(Image.open(path).convert("RGB"))))
    assert np.array_equal(imagefolder.stored_image(str(path), side), expected)


@pytest.mark.parametrize("portrait", [True, False])
def test_centre_crop_keeps_the_aspect_and_cuts_both_ends_alike(tmp_path, portrait):
    # 40 x 80: a red band on one end, blue on the other (16 px each), green between; the short side has a
    # dark half and a bright half. Stored at 20: resized to 20 x 40, then the middle 20 kept (rows 20-60 of
    # the original), so both bands go, 4 px clear of the filter's reach.
    pixels = np.zeros((80, 40, 3), dtype=np.uint8)
    pixels[:16, :, 0], pixels[16:64, :, 1], pixels[64:, :, 2] = 255, 255, 255
    pixels[:, 20:] |= 60
    if not portrait:
        pixels = pixels.transpose(1, 0, 2)
    path = tmp_path / "band.png"
    Image.fromarray(pixels).save(path)
    out = imagefolder.stored_image(str(path), 20).astype(int)
    if not portrait:
        out = out.transpose(1, 0, 2)
    assert out.shape == (20, 20, 3)
    assert (out[:, :, 1] == 255).all() and out[:, :, 0].max() == 60 and out[:, :, 2].max() == 60  # bands gone
    # the short side is only scaled, never squashed or cut: dark half, bright half, each 10 px wide
    assert (out[:, :9, 0] == 0).all() and (out[:, 11:, 0] == 60).all()


def test_greyscale_palette_and_rgba_files_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 77).save(grey)
    palette = tmp_path / "palette.png"
    Image.new("RGB", (8, 8), (200, 10, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba)  # fully transparent: alpha is dropped, colour kept
    assert (imagefolder.stored_image(str(grey), 8) == 77).all()
    assert (imagefolder.stored_image(str(palette), 8) == (200, 10, 30)).all()
    assert (imagefolder.stored_image(str(rgba), 8) == (10, 20, 30)).all()


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)).save(path)  # mid-grey in 16 bits
    assert Image.open(path).mode == "I;16" and (imagefolder.stored_image(str(path), 8) == 128).all()


# ------------------------------------------------------------------ the stored side


def test_mixed_sizes_and_orientations_share_one_stored_side(tmp_path):
    root = _folder(tmp_path / "ds", [(60, 40), (40, 60), (50, 50), (90, 45)])
    s = _load(root, tmp_path / "cache", side=32)
    assert s.train.images.shape == (8, 32, 32, 3) and s.stored_resolution == 32 and s.loader == "resident"


def test_stored_side_is_capped_by_the_images_own_size(tmp_path):
    # short sides 20, 20, 24 and one 120 outlier: the median (lower) is 20, so nothing is blown up to 224
    root = _folder(tmp_path / "ds", [(20, 30), (30, 20), (24, 24), (120, 160)])
    assert _load(root, tmp_path / "cache", side=224).stored_resolution == 20
    assert _load(root, tmp_path / "cache", side=None).stored_resolution == 20  # unasked: the cap itself
    assert _load(root, tmp_path / "cache", side=16).train.images.shape[1:] == (16, 16, 3)  # below the cap: as asked


def test_streaming_records_its_stored_side(tmp_path, monkeypatch):
    root = _folder(tmp_path / "ds", [(60, 40), (40, 60)])
    monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "1")
    s = _load(root, tmp_path / "cache", side=24)
    assert s.loader == "streaming" and s.stored_resolution == 24 and s.train.stored_resolution == 24


def test_parallel_decode_gives_the_same_array_as_one_thread(tmp_path):
    root = _folder(tmp_path / "ds", [(60, 40), (40, 60), (33, 71)])
    paths = imagefolder.list_folder(root).all_paths()
    one, _ = imagefolder.decode_images(paths, 24, threads=1)
    two, _ = imagefolder.decode_images(paths, 24, threads=2)
    assert np.array_equal(one, two) and one.any()


def test_the_pool_spreads_even_a_small_folder_over_its_threads(monkeypatch):
    seen = set()

    def decode(path: str, side: int) -> np.ndarray:
        seen.add(threading.get_ident())
        time.sleep(0.02)  # as a real decode would, without the GIL
        return np.zeros((side, side, 3), dtype=np.uint8)

    monkeypatch.setattr(imagefolder, "_decode", decode)
    imagefolder.decode_images([f"{i}.jpg" for i in range(8)], 4, threads=2)
    assert len(seen) == 2


# ------------------------------------------------------------------ resident and streaming agree


@pytest.mark.parametrize("resolution,interpolation", [(16, "bilinear"), (40, "bicubic"), (24, "nearest")])
def test_resident_and_streaming_give_the_same_tensor(tmp_path, monkeypatch, resolution, interpolation):
    root = _folder(tmp_path / "ds", [(60, 40), (40, 60), (50, 50), (91, 37)])
    resident = _load(root, tmp_path / "cache", side=24)
    monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "1")
    streaming = _load(root, tmp_path / "cache", side=24)
    assert resident.loader == "resident" and streaming.loader == "streaming"
    recipe = InputRecipe(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation=interpolation)
    args = dict(batch_size=3, resolution=resolution, device=CPU, augment="none", train=False, channels_last=True,
                recipe=recipe)
    a = list(DeviceLoader(resident.test, **args))
    b = list(StreamingLoader(streaming.test, workers=0, **args))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and xa.shape == xb.shape == (len(ya), 3, resolution, resolution)
        assert (xa - xb).abs().max() < 1e-5


def test_streaming_training_batches_are_augmented_at_the_stored_side(tmp_path, monkeypatch):
    root = _folder(tmp_path / "ds", [(60, 40), (40, 60), (50, 50), (91, 37)])
    monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "1")
    s = _load(root, tmp_path / "cache", side=24)
    batches = StreamingLoader(s.train, batch_size=4, resolution=32, device=CPU, augment="standard", workers=0)
    epoch1, epoch2 = [x for x, _ in batches], [x for x, _ in batches]
    assert len(epoch1) == 2 and epoch1[0].shape == (4, 3, 32, 32)
    assert not torch.equal(epoch1[0], epoch2[0])  # reshuffled and re-cropped each epoch


# ------------------------------------------------------------------ unreadable files


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    _noise(64, 48).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _add_bad_files(root: Path) -> tuple[Path, Path]:
    truncated, text = root / "train" / "a" / "truncated.jpg", root / "train" / "b" / "notes.jpg"
    _truncated_jpeg(truncated)
    text.write_text("not an image\n")
    return truncated, text


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("bad", ["truncated", "text"])
def test_an_unreadable_file_is_named_in_one_error(tmp_path, monkeypatch, streaming, bad):
    root = _folder(tmp_path / "ds", [(40, 30), (30, 40)])
    path = root / "train" / "a" / "bad.jpg"
    _truncated_jpeg(path) if bad == "truncated" else path.write_text("not an image\n")
    if streaming:
        monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "1")
    with pytest.raises(BadImageError) as caught:
        _load(root, tmp_path / "cache", side=24)
    text = str(caught.value)
    assert str(path) in text and "BENCH_SKIP_BAD_IMAGES=1" in text and "\n" not in text
    assert ("truncated" in text) if bad == "truncated" else ("not an image" in text)
    with pytest.raises(BadImageError, match="bad.jpg"):  # known bad from the manifest: still refused
        _load(root, tmp_path / "cache", side=24)


def test_several_unreadable_files_are_counted_and_named_in_one_line(tmp_path):
    root = _folder(tmp_path / "ds", [(40, 30), (30, 40)])
    truncated, text = _add_bad_files(root)
    with pytest.raises(BadImageError) as caught:
        _load(root, tmp_path / "cache", side=24)
    message = str(caught.value)
    assert message.startswith("2 files in") and str(truncated) in message and str(text) in message
    assert "\n" not in message


@pytest.mark.parametrize("streaming", [False, True])
def test_skipping_bad_files_leaves_them_out_and_says_how_many(tmp_path, monkeypatch, capsys, streaming):
    root = _folder(tmp_path / "ds", [(40, 30), (30, 40)])
    truncated, text = _add_bad_files(root)
    monkeypatch.setenv("BENCH_SKIP_BAD_IMAGES", "1")
    if streaming:
        monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "1")
    for _ in range(2):  # decoded, then from the cache: the same images and the same warning
        s = _load(root, tmp_path / "cache", side=24)
        assert len(s.train) == 4 and np.bincount(s.train.labels).tolist() == [2, 2]
        err = capsys.readouterr().err
        assert "skipped 2 unreadable" in err and str(truncated) in err and str(text) in err
    if not streaming:
        assert s.train.images.reshape(4, -1).any(axis=1).all()  # no blank rows left where the bad ones were


# ------------------------------------------------------------------ the cache key


def _caches(root: Path) -> set[Path]:
    return set((root / "bench-cache").glob("*.npy"))


def test_cache_notices_files_added_removed_replaced_and_a_new_side(tmp_path):
    root = _folder(tmp_path / "ds", [(40, 30), (30, 40)])
    cache = tmp_path / "cache"
    first = _load(root, cache, side=24)
    seen = _caches(cache)
    assert len(first.train) == 4 and _load(root, cache, side=24) and _caches(cache) == seen  # reused

    _noise(50, 50, seed=7).save(root / "train" / "a" / "new.png")  # added
    assert len(_load(root, cache, side=24).train) == 5 and len(_caches(cache)) == len(seen) + 1
    (root / "train" / "a" / "new.png").unlink()  # removed: back to the first cache
    assert np.array_equal(_load(root, cache, side=24).train.images, first.train.images)

    replaced = root / "train" / "a" / "0.png"
    stat = replaced.stat()
    _noise(40, 30, seed=99).save(replaced)
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same name, new content
    again = _load(root, cache, side=24)
    assert not np.array_equal(again.train.images, first.train.images)

    assert _load(root, cache, side=16).train.images.shape[1:] == (16, 16, 3)  # another side: its own cache


def test_cache_key_holds_the_side_and_the_recipe(tmp_path, monkeypatch):
    paths = [str(_folder(tmp_path / "ds", [(40, 30)]) / "train" / "a" / "0.png")]
    key = imagefolder.cache_file(paths, tmp_path, 24)
    assert imagefolder.cache_file(paths, tmp_path, 32) != key
    monkeypatch.setattr(imagefolder, "STORED_RECIPE", imagefolder.STORED_RECIPE + "-changed")
    assert imagefolder.cache_file(paths, tmp_path, 24) != key
