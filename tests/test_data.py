"""Datasets and the device-resident loader: readers, splits, caching, augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data, loader
from bench.data import ImageArrays
from bench.recipe import IMAGENET_MEAN, IMAGENET_STD
from bench.errors import DatasetUnavailableError, UnknownDatasetError
from bench.loader import DeviceLoader

CPU = torch.device("cpu")


# ------------------------------------------------------------------ registry and synthetic


def test_unknown_dataset_lists_close_matches():
    with pytest.raises(UnknownDatasetError, match="cifar10"):
        data.parse_name("cifar11")


def test_synthetic_is_deterministic_and_class_dependent():
    a, b = data.synthetic_raw(seed=3), data.synthetic_raw(seed=3)
    assert np.array_equal(a.train.images, b.train.images)
    assert a.train.images.shape == (2000, 32, 32, 3) and a.train.images.dtype == np.uint8
    means = np.stack([a.train.images[a.train.labels == k].mean(axis=(0, 1, 2)) for k in range(10)])
    # class colours differ: the spread of class means is far above the pixel noise of a mean over ~200 images
    assert means.std(axis=0).mean() > 10


def test_splits_are_reproducible_and_disjoint():
    one = data.load_splits("synthetic", val_fraction=0.2)
    two = data.load_splits("synthetic", val_fraction=0.2)
    assert len(one.val) == 400 and len(one.train) == 1600
    assert np.array_equal(one.val.labels, two.val.labels) and np.array_equal(one.train.images, two.train.images)
    train_rows = {r.tobytes() for r in one.train.images}
    assert not any(r.tobytes() in train_rows for r in one.val.images)


def test_subsets_cap_the_splits():
    s = data.load_splits("synthetic", train_subset=100, test_subset=50)
    assert (len(s.train), len(s.test), len(s.val)) == (100, 50, 50)


# ------------------------------------------------------------------ CIFAR readers on real-format files


def _write_cifar(root: Path, hundred: bool, per_batch: int = 20) -> dict:
    from torchvision import datasets

    official = datasets.CIFAR100 if hundred else datasets.CIFAR10
    folder = root / official.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"
    n_classes = 100 if hundred else 10
    written = {}
    for name, _ in official.train_list + official.test_list:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": pixels, key: labels, "batch_label": name}, fh)
        written[name] = (pixels, labels)
    names = [f"c{i}" for i in range(n_classes)]
    with open(folder / official.meta["filename"], "wb") as fh:
        pickle.dump({official.meta["key"]: names}, fh)
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reader_reads_the_real_on_disk_format(tmp_path, hundred):
    written = _write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    s = data.load_splits(name, tmp_path, val_fraction=0.0, download=False)
    n_train = 20 * (1 if hundred else 5)
    assert len(s.train) == n_train and len(s.test) == 20 and len(s.classes) == (100 if hundred else 10)
    test_pixels, test_labels = written["test"] if hundred else written["test_batch"]
    # CIFAR rows are channel-planar (R then G then B planes); the reader yields HWC images.
    expected = test_pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(s.test.images, expected)
    assert s.test.labels.tolist() == test_labels


def test_missing_cifar_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        data.load_splits("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "bench fetch cifar10" in message


def test_failed_download_is_one_clear_sentence(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetUnavailableError, match="download failed.*bench fetch cifar10"):
        data.load_splits("cifar10", tmp_path, download=True)


# ------------------------------------------------------------------ image folders


def _write_folder(root: Path, per_class: int = 6, size: int = 16, splits=("train", "test")) -> None:
    from PIL import Image

    for split in splits:
        for k, cls in enumerate(["cat", "ant", "bee"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (k * 100, i * 10, 50)).save(root / split / cls / f"{i}.png")


def test_imagefolder_reads_classes_counts_and_caches(tmp_path, monkeypatch):
    _write_folder(tmp_path / "ds")
    s = data.load_splits(f"imagefolder:{tmp_path / 'ds'}", tmp_path / "root", val_fraction=0.0)
    assert s.classes == ["ant", "bee", "cat"] and s.loader == "resident"
    assert len(s.train) == 18 and len(s.test) == 18 and s.stored_resolution == 16  # unasked: the images' own side
    # colour encodes the class: red channel = 100 * index in the original order (cat, ant, bee)
    red_of = {"cat": 0, "ant": 100, "bee": 200}
    for img, label in zip(s.test.images, s.test.labels):
        assert img[0, 0, 0] == red_of[s.classes[label]]
    assert len(list((tmp_path / "root" / "bench-cache").glob("*.npy"))) == 2

    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = data.load_splits(f"imagefolder:{tmp_path / 'ds'}", tmp_path / "root", val_fraction=0.0)
    assert np.array_equal(again.test.images, s.test.images)


def test_imagefolder_uses_valid_split_when_present(tmp_path):
    _write_folder(tmp_path / "ds", splits=("train", "valid", "test"))
    s = data.load_splits(f"imagefolder:{tmp_path / 'ds'}", tmp_path / "root")
    assert len(s.val) == 18 and len(s.train) == 18


def test_missing_imagefolder_is_clear(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="needs .*train and .*test"):
        data.load_splits(f"imagefolder:{tmp_path / 'nothing'}", tmp_path)


def test_large_imagefolder_streams_with_the_same_interface(tmp_path, monkeypatch):
    _write_folder(tmp_path / "ds", size=20)
    monkeypatch.setenv("BENCH_RESIDENT_MAX_BYTES", "100")
    s = data.load_splits(f"imagefolder:{tmp_path / 'ds'}", tmp_path / "root", val_fraction=0.0)
    assert s.loader == "streaming"
    batches = loader.make_loader(s.train, batch_size=4, resolution=24, device=CPU, augment="standard",
                                 train=True, channels_last=True, seed=0)
    batches.loader.num_workers = 0
    x, y = next(iter(batches))
    assert x.shape == (4, 3, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and len(batches) == 4


def test_real_cifar10_images_load_with_the_right_classes_and_counts(cifar_jpg, session_data_root):
    s = data.load_splits(f"imagefolder:{cifar_jpg}", session_data_root, val_fraction=0.1)
    assert s.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.train.images.shape[1:] == (32, 32, 3)
    assert np.bincount(s.test.labels).tolist() == [1000] * 10


# ------------------------------------------------------------------ augmentation


def _loader(n=64, **kw) -> DeviceLoader:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[:, :, :, 0] = (np.arange(n) % 256)[:, None, None]  # red channel = image index: labels stay attached
    arrays = ImageArrays(images, np.arange(n, dtype=np.int64))
    args = dict(batch_size=16, resolution=64, device=CPU, augment="standard", train=True, channels_last=True, seed=0)
    args.update(kw)
    return DeviceLoader(arrays, **args)


@pytest.mark.parametrize("resolution", [16, 32, 64, 224])
@pytest.mark.parametrize("augment", ["standard", "none", "strong"])
def test_batches_have_shape_range_and_layout(resolution, augment):
    loader = _loader(resolution=resolution, augment=augment)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, resolution, resolution) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert x.min() >= low - 1e-4 and x.max() <= high + 1e-4


def test_labels_stay_with_their_images():
    loader = _loader(augment="none", resolution=32)
    for x, y in loader:
        red = x[:, 0, 16, 16] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        assert torch.allclose(red * 255, y.float(), atol=0.6)


def test_epochs_reshuffle_and_crops_differ():
    loader = _loader()
    first = [(x.clone(), y.clone()) for x, y in loader]
    second = [(x.clone(), y.clone()) for x, y in loader]
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    # the same image in two epochs gets a different crop/flip
    index = {int(v): (b, i) for b, (_, y) in enumerate(first) for i, v in enumerate(y)}
    diffs = 0
    for x2, y2 in second:
        for i, v in enumerate(y2):
            b, j = index[int(v)]
            diffs += not torch.allclose(first[b][0][j], x2[i])
    assert diffs > 48  # of 64; a few may draw the same shift and flip by chance


def test_standard_crop_is_a_shifted_flipped_window_of_the_zero_padded_image():
    """Each output equals torchvision's RandomCrop(padding=4) + flip for some shift and flip."""
    img = torch.randint(1, 256, (8, 32, 32, 3), dtype=torch.uint8)
    out = loader.augment_batch(img, "standard", torch.Generator().manual_seed(1))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(img.permute(0, 3, 1, 2).float() / 255, (4, 4, 4, 4))
    for k in range(8):
        candidates = [padded[k, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[k], c) for c in candidates), k


def test_evaluation_is_deterministic_and_in_order():
    loader = _loader(train=False, n=40)
    a = [(x.clone(), y.clone()) for x, y in loader]
    b = [(x.clone(), y.clone()) for x, y in loader]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert torch.cat([y for _, y in a]).tolist() == list(range(40))  # the ragged last batch is kept


def test_training_drops_the_ragged_batch():
    loader = _loader(n=40)
    assert len(loader) == 2 and sum(len(y) for _, y in loader) == 32


def test_same_seed_same_batches():
    a = [x for x, _ in _loader(seed=5)]
    b = [x for x, _ in _loader(seed=5)]
    assert all(torch.equal(x1, x2) for x1, x2 in zip(a, b))


@pytest.mark.slow
def test_small_network_learns_real_cifar10_from_scratch_on_the_cpu(cifar_jpg, session_data_root):
    """The whole data path on real images: one epoch on 3,000 of them lifts test accuracy clearly above chance."""
    import time

    from bench import models, train
    from bench.suite import Cell

    cell = Cell(dataset=f"imagefolder:{cifar_jpg}", model="tv:resnet18", resolution=32, batch_size=32, epochs=1,
                pretrained=False, optimizer="adamw", lr=1e-3, augment="none", train_subset=3000, test_subset=1000)
    splits = data.load_splits(cell.dataset, session_data_root, train_subset=3000, test_subset=1000)
    torch.manual_seed(0)
    backbone = models.build(cell, 10)
    started = time.perf_counter()
    outcome = train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None)
    print(f"real CIFAR-10, resnet18 from scratch, 1 epoch on 3000 images: top1 {outcome.row['top1']:.3f} "
          f"in {time.perf_counter() - started:.1f} s")
    assert outcome.row["top1"] > 0.25  # chance is 0.10
