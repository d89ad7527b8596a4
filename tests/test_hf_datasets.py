"""Hugging Face datasets (`hf:`): small datasets built with `datasets` itself (an Image and a ClassLabel column, with
and without a validation split), saved to disk or placed in a private `datasets` cache as a download leaves them,
read offline into the image folders' stored arrays, and run through validate, run and report. No test touches
the network: the cache is this test's own and the offline switches are on."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from bench import data, hfdata, imagefolder  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.errors import BadImageError, DatasetUnavailableError, SuiteError, UnknownDatasetError  # noqa: E402
from bench.runner import RunOptions, run_suite  # noqa: E402
from bench.store import ResultStore  # noqa: E402
from bench.suite import expand, parse_suite  # noqa: E402

CLASSES = ["red", "green", "blue"]
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)


@pytest.fixture(autouse=True)
def private_offline_cache(tmp_path, monkeypatch) -> Path:
    """This test's own `datasets` cache, and every offline switch on: nothing here may reach the network."""
    cache = tmp_path / "hf-home" / "datasets"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("BENCH_SKIP_BAD_IMAGES", raising=False)
    return cache


def _images(n: int, seed: int, size: tuple[int, int] = (20, 28)) -> tuple[list[Image.Image], list[int]]:
    """Learnable images: each class its own colour, with noise; sizes vary a little, as real datasets' do."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    images = []
    for i, label in enumerate(labels):
        h, w = size[0] + i % 3, size[1] - i % 2
        pixels = COLOURS[label] + rng.integers(-25, 25, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images, labels


def _split(n: int, seed: int, extra_label: bool = False):
    images, labels = _images(n, seed)
    columns = {"picture": images, "label": labels, "caption": [f"image {i}" for i in range(n)]}
    features = {"picture": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                "caption": datasets.Value("string")}
    if extra_label:  # a second ClassLabel (as CIFAR-100's fine and coarse labels): which one is meant?
        columns["warm"] = [int(label == 0) for label in labels]
        features["warm"] = datasets.ClassLabel(names=["cool", "warm"])
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _dataset(train: int = 36, test: int = 12, validation: int | None = 9, extra_label: bool = False):
    splits = {"train": _split(train, 0, extra_label), "test": _split(test, 1, extra_label)}
    if validation:
        splits["validation"] = _split(validation, 2, extra_label)
    return datasets.DatasetDict(splits)


def _saved(folder: Path, **kwargs) -> Path:
    _dataset(**kwargs).save_to_disk(str(folder))
    return folder


def _in_cache(cache: Path, tmp_path: Path, repo: str, config: str | None = None, **kwargs) -> None:
    """Put `repo` (OWNER/NAME) in the `datasets` cache as `load_dataset(repo)` leaves it after a download:
    built by the library from Parquet files in a folder named NAME, then moved to OWNER___NAME."""
    owner, name = repo.split("/")
    source = tmp_path / "hub-files" / name
    (source / "data").mkdir(parents=True)
    dataset = _dataset(**kwargs)
    for split, part in dataset.items():
        part.to_parquet(str(source / "data" / f"{split}-00000-of-00001.parquet"))
    if config:  # a dataset card naming the config, as a Hub repository with several configs has
        files = [{"split": s, "path": f"data/{s}-*.parquet"} for s in dataset]
        card = yaml.safe_dump({"configs": [{"config_name": config, "data_files": files}]})
        (source / "README.md").write_text(f"---\n{card}---\n")
    built = tmp_path / "hub-build"
    datasets.load_dataset(str(source), config, cache_dir=str(built))
    cache.mkdir(parents=True, exist_ok=True)
    (built / name).rename(cache / f"{owner}___{name}")


def _png_pixels(image: Image.Image, side: int, tmp_path: Path) -> np.ndarray:
    """What an image folder stores for the same picture."""
    path = tmp_path / "same.png"
    image.save(path)
    return imagefolder.stored_image(str(path), side)


# ------------------------------------------------------------------ reading: splits, pixels, classes


def test_a_saved_dataset_keeps_its_own_validation_split_and_stores_as_image_folders_do(tmp_path):
    folder = _saved(tmp_path / "saved")
    s = data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16)
    assert s.classes == CLASSES and s.loader == "resident" and s.stored_resolution == 16
    assert (len(s.train), len(s.val), len(s.test)) == (36, 9, 12)  # validation is the dataset's, train whole
    assert s.train.images.shape == (36, 16, 16, 3) and s.train.images.dtype == np.uint8
    assert s.val.labels.tolist() == _images(9, 2)[1] and s.test.labels.tolist() == _images(12, 1)[1]
    test_images, _ = _images(12, 1)
    for i in (0, 5, 11):  # the test split keeps its order: the same pixels an image folder stores
        assert np.array_equal(s.test.images[i], _png_pixels(test_images[i], 16, tmp_path))
    assert (s.train.images.reshape(36, -1, 3).mean(1).argmax(1) == s.train.labels).all()  # colour is the class


def test_without_a_validation_split_bench_carves_one_from_train(tmp_path):
    folder = _saved(tmp_path / "saved", validation=None)
    s = data.load_splits(f"hf:{folder}", tmp_path / "root", val_fraction=0.25, stored_resolution=16)
    assert (len(s.train), len(s.val), len(s.test)) == (27, 9, 12)
    assert sorted(s.train.labels.tolist() + s.val.labels.tolist()) == sorted(_images(36, 0)[1])


def test_the_stored_side_is_capped_by_the_images_own_size(tmp_path):
    folder = _saved(tmp_path / "saved")
    s = data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=224)
    assert s.stored_resolution == 21 and s.train.images.shape[1:] == (21, 21, 3)  # short sides 20..22: median 21


def test_a_dataset_in_the_cache_loads_offline_by_name_and_config(tmp_path, private_offline_cache):
    _in_cache(private_offline_cache, tmp_path, "someone/colours")
    s = data.load_splits("hf:someone/colours", tmp_path / "root", stored_resolution=16)
    assert s.classes == CLASSES and (len(s.train), len(s.val), len(s.test)) == (36, 9, 12)
    _in_cache(private_offline_cache, tmp_path / "other", "someone/shades", config="small", validation=None)
    s = data.load_splits("hf:someone/shades:small", tmp_path / "root", stored_resolution=16)
    assert (len(s.train) + len(s.val), len(s.test)) == (36, 12)
    assert "ready in" in data.fetch("hf:someone/colours")  # cached: fetch has nothing to download


def test_offline_and_not_cached_is_unavailable_in_one_sentence_that_says_how_to_fetch(tmp_path, private_offline_cache):
    with pytest.raises(DatasetUnavailableError) as caught:
        data.load_splits("hf:someone/absent", tmp_path / "root")
    text = str(caught.value)
    assert "hf:someone/absent" in text and str(private_offline_cache) in text
    assert "`bench fetch hf:someone/absent`" in text and "HF_HUB_OFFLINE=1" in text and "\n" not in text
    _in_cache(private_offline_cache, tmp_path, "someone/colours")
    with pytest.raises(DatasetUnavailableError, match="bench fetch hf:someone/colours:other"):  # not this config
        data.prepare("hf:someone/colours:other", tmp_path / "root", download=False)
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        data.load_splits(f"hf:{tmp_path / 'nowhere'}", tmp_path / "root")


def test_sizes_for_estimates_come_without_decoding_or_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder, "_decode", lambda *_: pytest.fail("decoded an image"))
    assert hfdata.sizes(str(_saved(tmp_path / "saved"))) == (36, 9, 12, 3)
    assert hfdata.sizes(str(_saved(tmp_path / "two", extra_label=True, validation=None)), "warm") == (36, None, 12, 2)
    assert hfdata.sizes("someone/absent") is None


@pytest.mark.parametrize("name", ["hf:", "hf:a/b/c", "hf:owner/name:", "hf:own er/name"])
def test_malformed_names_are_refused_before_anything_is_read(name):
    with pytest.raises(UnknownDatasetError, match="hf:OWNER/NAME"):
        data.parse_name(name)


# ------------------------------------------------------------------ columns


def test_columns_are_found_by_their_features_or_named(tmp_path):
    folder = _saved(tmp_path / "saved", extra_label=True)
    with pytest.raises(SuiteError) as caught:  # two ClassLabel columns: the suite must choose
        data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16)
    assert "label, warm" in str(caught.value) and "label_column" in str(caught.value)
    s = data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16, label_column="warm")
    assert s.classes == ["cool", "warm"] and set(s.test.labels.tolist()) == {0, 1}
    with pytest.raises(SuiteError, match=r"'pictures' is not one of its columns \(did you mean: picture\?\)"):
        data.load_splits(f"hf:{folder}", tmp_path / "root", image_column="pictures", label_column="label")
    with pytest.raises(SuiteError, match="'caption' holds Value values, not Image"):
        data.load_splits(f"hf:{folder}", tmp_path / "root", image_column="caption", label_column="label")


def test_a_split_without_labels_is_refused_with_its_name(tmp_path):
    dataset = _dataset()
    dataset["test"] = dataset["test"].map(lambda row: {"label": -1})  # the Hub's way of hiding test labels
    dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SuiteError, match="12 of the 12 images of its test split have no class"):
        data.load_splits(f"hf:{tmp_path / 'saved'}", tmp_path / "root")


def test_a_suite_names_columns_only_for_hf_datasets(tmp_path):
    raw = {"name": "cols", "dataset": "cifar10", "defaults": {"label_column": "fine_label"}, "grid": {"model": ["x"]}}
    with pytest.raises(SuiteError, match="label_column names a column of an hf: dataset"):
        parse_suite(raw)
    cells = expand(parse_suite({**raw, "dataset": "hf:uoft-cs/cifar100"}))
    assert cells[0].label_column == "fine_label" and cells[0].image_column is None


# ------------------------------------------------------------------ the cache of stored arrays, bad images


def test_decoded_once_then_read_from_the_cache_keyed_by_fingerprint_and_side(tmp_path, monkeypatch):
    folder = _saved(tmp_path / "saved")
    first = data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16)
    arrays = set((tmp_path / "root" / "bench-cache").glob("hf-*.npy"))

    def no_decoding(*_args):
        raise AssertionError("decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(imagefolder, "_decode", no_decoding)
        again = data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16)
    assert np.array_equal(again.train.images, first.train.images)
    assert set((tmp_path / "root" / "bench-cache").glob("hf-*.npy")) == arrays
    assert data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=12).train.images.shape[1] == 12
    changed = _dataset()
    changed["test"] = changed["test"].map(lambda row: {"picture": Image.new("RGB", (20, 20), (9, 9, 9))})
    changed.save_to_disk(str(tmp_path / "changed"))  # new content, new fingerprint: new arrays
    other = data.load_splits(f"hf:{tmp_path / 'changed'}", tmp_path / "root", stored_resolution=16)
    assert (other.test.images == 9).all() and not (first.test.images == 9).all()


def _with_bad_rows(folder: Path) -> Path:
    dataset = _dataset()
    garbage = {"bytes": b"not an image at all", "path": None}
    truncated = io.BytesIO()
    _images(1, 5)[0][0].save(truncated, format="PNG")
    rows = {3: garbage, 7: {"bytes": truncated.getvalue()[:60], "path": None}}
    train = dataset["train"].cast_column("picture", datasets.Image(decode=False))
    train = train.map(lambda row, i: {"picture": rows.get(i, row["picture"])}, with_indices=True)
    dataset["train"] = train.cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(folder))
    return folder


def test_unreadable_images_are_named_as_image_folders_name_them_or_skipped(tmp_path, monkeypatch, capsys):
    folder = _with_bad_rows(tmp_path / "saved")
    for _ in range(2):  # decoded, then known from the manifest: refused both times
        with pytest.raises(BadImageError) as caught:
            data.load_splits(f"hf:{folder}", tmp_path / "root", stored_resolution=16)
        text = str(caught.value)
        assert text.startswith(f"2 images in hf:{folder} cannot be decoded: hf:{folder} train[3] (not an image")
        assert f"hf:{folder} train[7]" in text and "BENCH_SKIP_BAD_IMAGES=1" in text and "\n" not in text
    monkeypatch.setenv("BENCH_SKIP_BAD_IMAGES", "1")
    s = data.load_splits(f"hf:{folder}", tmp_path / "root", val_fraction=0.0, stored_resolution=16)
    assert len(s.train) == 34 and "skipped 2 unreadable image(s)" in capsys.readouterr().err
    assert s.train.images.reshape(34, -1).any(axis=1).all()  # no blank rows where the bad ones were


# ------------------------------------------------------------------ validate, run, report; fetch


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_validate_run_and_report_a_suite_on_an_hf_dataset(tmp_path):
    folder = _saved(tmp_path / "saved")
    suite = {"name": "hf_colours", "dataset": f"hf:{folder}", "grid": {"model": ["tv:resnet18"]},
             "defaults": {"resolution": 16, "batch_size": 12, "epochs": 1, "pretrained": False, "lr": 0.05,
                          "infer_bench": "off"}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    checked = _bench("validate", "suite.yaml", "--no-estimate", cwd=tmp_path)
    assert checked.returncode == 0 and "tv:resnet18" in checked.stdout, checked.stdout + checked.stderr
    ran = _bench("run", "suite.yaml", "--data-root", "data", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    row = ResultStore(tmp_path / "results").read().cells.iloc[0]
    assert row["status"] == "ok" and row["num_classes"] == 3 and list(row["class_names"]) == CLASSES
    assert (row["train_images"], row["val_images"], row["test_images"]) == (36, 9, 12)
    assert row["stored_resolution"] == 16 and 0 <= row["top1"] <= 1
    reported = _bench("report", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    assert row["cell_id"] in (tmp_path / "reports" / "leaderboard.md").read_text()


def test_a_run_offline_without_the_dataset_records_unavailable_cells(tmp_path, private_offline_cache):
    suite = parse_suite({"name": "hf_absent", "dataset": "hf:someone/absent", "grid": {"model": ["tv:resnet18"]},
                         "defaults": {"resolution": 16, "pretrained": False}})
    done = run_suite(suite, expand(suite), RunOptions(results=tmp_path / "res", data_root=tmp_path / "data"))
    (row,) = done.rows
    assert row["status"] == "unavailable" and str(private_offline_cache) in row["error"]
    assert "bench fetch hf:someone/absent" in row["error"]


def test_fetch_reports_a_cached_dataset_and_explains_a_missing_one(tmp_path, private_offline_cache):
    _in_cache(private_offline_cache, tmp_path, "someone/colours")
    ok = CliRunner().invoke(main, ["fetch", "hf:someone/colours"])
    assert ok.exit_code == 0 and f"hf:someone/colours: ready in {private_offline_cache}" in ok.stdout, ok.output
    missing = CliRunner().invoke(main, ["fetch", "hf:someone/absent"])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: hf:someone/absent is not in the datasets")
    assert "bench fetch hf:someone/absent" in missing.stderr and missing.stderr.count("\n") == 1


def test_a_suite_that_names_the_label_column_runs_on_a_dataset_with_two(tmp_path):
    folder = _saved(tmp_path / "saved", extra_label=True)  # two ClassLabel columns: label and warm
    suite = parse_suite({"name": "hf_named", "dataset": f"hf:{folder}", "grid": {"model": ["tv:resnet18"]},
                         "defaults": {"resolution": 16, "batch_size": 12, "epochs": 1, "pretrained": False,
                                      "label_column": "warm", "infer_bench": "off"}})
    done = run_suite(suite, expand(suite), RunOptions(results=tmp_path / "res", data_root=tmp_path / "data"))
    (row,) = done.rows
    assert row["status"] == "ok", row["error"]
    assert row["num_classes"] == 2 and list(row["class_names"]) == ["cool", "warm"]


def test_validate_estimates_an_hf_dataset_from_its_own_sizes(tmp_path):
    from bench import validate

    folder = _saved(tmp_path / "saved")
    cell = parse_suite({"name": "est", "dataset": f"hf:{folder}", "grid": {"model": ["tv:resnet18"]},
                        "defaults": {"resolution": 16, "pretrained": False}})
    estimate = validate.estimate(expand(cell), results=tmp_path / "none", target=validate.target_device("cpu"))
    assert estimate.cells[0].seconds is not None and estimate.cells[0].seconds > 0
    assert validate._dataset_sizes(f"hf:{folder}") == (36, 9, 12, 3)  # not counted as an image folder
