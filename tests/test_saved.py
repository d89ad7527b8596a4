"""Keep the trained model (`save_model`) and use it (`bench predict`): the saved model classifies image files
exactly as the cell's own test pass did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import saved
from bench.data import synthetic_raw
from bench.runner import RunOptions, run_suite
from bench.saved import predict
from bench.suite import expand, parse_suite
from bench.train.metrics import unpack_correct


def _image_folder(root: Path) -> Path:
    raw = synthetic_raw(num_classes=4, train_size=160, test_size=40, seed=3)
    for split, arrays in (("train", raw.train), ("test", raw.test)):
        for i, (image, label) in enumerate(zip(arrays.images, arrays.labels)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")  # lossless: the cell and predict see the same pixels
    return root


def _suite(folder: Path, save: str, seeds: list[int], **defaults):
    return parse_suite({"name": "keep", "dataset": f"imagefolder:{folder}",
                        "defaults": {"pretrained": False, "epochs": 2, "batch_size": 16, "resolution": 32,
                                     "save_model": save, "infer_bench": "off", "seeds": seeds, **defaults},
                        "grid": {"model": ["tv:resnet18"]}})


def _test_images(folder: Path) -> tuple[list[Path], list[int]]:
    """The test split in the order the cell evaluated it: classes in order, files sorted within each."""
    images = sorted((folder / "test").glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    return images, [int(p.parent.name.removeprefix("class")) for p in images]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("keep-images"))


@pytest.fixture(scope="module")
def kept(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("keep")
    folder = images
    suite = _suite(folder, "all", [0, 1])
    rows = run_suite(suite, expand(suite), RunOptions(results=root / "results", data_root=root / "data")).rows
    return root, folder, rows


def test_save_model_all_keeps_every_ok_cell_and_predict_matches_its_test_pass(kept):
    root, folder, rows = kept
    assert [r["status"] for r in rows] == ["ok", "ok"]
    models = root / "results" / "keep" / "models"
    for row in rows:
        weights = models / f"{row['cell_id']}--{row['run_id']}.safetensors"
        meta = json.loads(weights.with_suffix(".json").read_text())
        assert meta["cell_id"] == row["cell_id"] and meta["classes"] == [f"class{i}" for i in range(4)]
        images, labels = _test_images(folder)
        found = predict(weights, images, top=1)
        right = np.array([f.top[0][0] == f"class{y}" for f, y in zip(found, labels)])
        assert np.array_equal(right, unpack_correct(row["test_correct"], row["test_images"]))
        assert right.mean() == pytest.approx(row["top1"])


def test_save_model_best_keeps_only_the_best_validation_cell(kept, tmp_path):
    _, folder, _ = kept
    suite = _suite(folder, "best", [0, 1, 2])
    rows = run_suite(suite, expand(suite), RunOptions(results=tmp_path / "results", data_root=tmp_path / "data")).rows
    models = tmp_path / "results" / "keep" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["best.json", "best.safetensors"]
    best = max(rows, key=lambda r: r["val_top1_best"])
    assert json.loads((models / "best.json").read_text())["val_top1_best"] == best["val_top1_best"]


def test_bench_predict_prints_the_top_classes_and_explains_a_bad_file(kept, tmp_path):
    root, folder, rows = kept
    weights = next((root / "results" / "keep" / "models").glob("*.safetensors"))
    image = next((folder / "test").glob("class2/*.png"))
    out = subprocess.run([sys.executable, "-m", "bench.cli", "predict", str(weights), str(image), "--top", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"{image}: class") and line.count("%") == 2
    bad = subprocess.run([sys.executable, "-m", "bench.cli", "predict", str(tmp_path / "nope.safetensors"), str(image)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope" in bad.stderr


def test_predict_runs_at_the_cells_precision_without_its_weights_file(images, tmp_path, monkeypatch):
    """A bf16 cell (CPU autocast) that started from a checkpoint of its own: predict needs only the saved file,
    runs under bf16 as the cell's test pass did, and agrees with that pass image by image."""
    import torch
    import torchvision

    own = tmp_path / "own.pth"
    torch.save(torchvision.models.resnet18().state_dict(), own)
    suite = _suite(images, "all", [0], pretrained=True, weights=str(own), precision="bf16", epochs=1)
    row, = run_suite(suite, expand(suite), RunOptions(results=tmp_path / "results", data_root=tmp_path / "data")).rows
    assert row["status"] == "ok" and row["precision"] == "bf16"
    own.unlink()  # the saved file holds every weight: the cell's own checkpoint is not needed again
    weights = next((tmp_path / "results" / "keep" / "models").glob("*.safetensors"))
    assert json.loads(weights.with_suffix(".json").read_text())["precision"] == "bf16"
    dtypes = set()

    def load(path):
        loaded = saved_load(path)
        loaded[0].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        return loaded

    saved_load = saved.load
    monkeypatch.setattr(saved, "load", load)
    test_images, labels = _test_images(images)
    found = predict(weights, test_images, top=1)
    assert dtypes == {torch.bfloat16}
    right = np.array([f.top[0][0] == f"class{y}" for f, y in zip(found, labels)])
    assert np.array_equal(right, unpack_correct(row["test_correct"], row["test_images"]))
