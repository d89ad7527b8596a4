"""A report never crashes: reports built from the awkward shapes real results take, each checked for the plots the
data allows (drawn for real) and a reason for every other; and a plot or a section that raises is one line, with
the rest of the report written."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import numpy as np
import pytest

from bench.report import build_report
from bench.report import plots as report_plots
from bench.report import sections as report_sections
from bench.report.plots import PLOTS, PlotSpec
from bench.store import ResultStore
from bench.suite import Cell

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
CLASSES = ["cat", "dog", "frog"]
PARAMS = {"resnet18": 11_689_512, "vgg16": 138_357_544}


def row(cell: Cell, *, gpu: bool = True, **overrides) -> dict:
    """A result row with what the report reads; accuracy rises with resolution, fine-tuning and labels."""
    frozen = str(cell.freeze) != "none"
    top1 = (0.6 + (0.1 if cell.model == "vgg16" else 0) + cell.resolution / 2000 - (0.05 if frozen else 0)
            + 0.01 * cell.seed + (0.02 * np.log10(cell.train_subset) - 0.1 if cell.train_subset else 0))
    base = {
        **cell.model_dump(), "freeze": str(cell.freeze), "run_id": "r1", "cell_id": cell.id, "group_id": cell.group_id,
        "status": "ok", "top1": top1, "val_top1_best": top1 + 0.01, "top5": 0.99, "test_images": 300,
        "train_images": cell.train_subset or 5000, "train_s": 10.0 * cell.resolution / 32 * (0.4 if frozen else 1) + cell.seed,
        "images_per_s": 500.0, "total_params": PARAMS[cell.model], "trainable_params": 5_000 if frozen else PARAMS[cell.model],
        "model_bytes": 4 * PARAMS[cell.model], "infer_latency_ms_p50": 2.0 * cell.resolution / 32,
        "infer_latency_ms_p95": 3.0 * cell.resolution / 32, "infer_images_per_s": 4000.0 * 32 / cell.resolution,
        "peak_vram_allocated_bytes": cell.batch_size * cell.resolution**2 * 900 if gpu else None,
        "peak_vram_train_bytes": cell.batch_size * cell.resolution**2 * 800 if gpu else None,
        "device": "cuda:0" if gpu else "cpu", "gpu_name": "NVIDIA H100 80GB HBM3" if gpu else None,
        "class_names": CLASSES, "confusion_matrix": [[80, 15, 5], [30, 60, 10], [2, 3, 95]],
        "per_class_top1": [0.8, 0.6, 0.95], "started_at": T0, "finished_at": T0 + dt.timedelta(seconds=cell.seed),
    }
    return {**base, **overrides}


def epochs(r: dict) -> list[dict]:
    if r["status"] != "ok" or r["mode"] != "train" or r["top1"] is None or np.isnan(r["top1"]):
        return []
    return [{"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
             "val_top1": r["top1"] - 0.05 * (1 - e), "epoch_s": 1.0} for e in range(2)]


def cells(models=("resnet18",), resolutions=(32,), freezes=("none",), seeds=(0,), **grid) -> list[Cell]:
    keys = list(grid)
    out = []
    for m, r, f, s, *rest in itertools.product(models, resolutions, freezes, seeds, *grid.values()):
        out.append(Cell(suite="shape", dataset="cifar10", model=m, resolution=r, freeze=f, seed=s, **dict(zip(keys, rest))))
    return out


def one_model(root: Path) -> None:  # the seaborn 0.13 ZeroDivisionError: one hue level in a dodged point plot
    write(root, [row(c) for c in cells(freezes=("none", "all"), seeds=(0, 1))])


def one_cell(root: Path) -> None:
    write(root, [row(c) for c in cells()])


def all_failed(root: Path) -> None:
    write(root, [row(c, status="oom", error="CUDA out of memory", top1=None, val_top1_best=None, train_s=None,
                     confusion_matrix=None) for c in cells(models=("resnet18", "vgg16"), seeds=(0, 1))])


def one_seed(root: Path) -> None:
    write(root, [row(c) for c in cells(models=("resnet18", "vgg16"), resolutions=(32, 64))])


def nan_accuracies(root: Path) -> None:
    rows = [row(c) for c in cells(models=("resnet18", "vgg16"), resolutions=(32, 64), seeds=(0, 1))]
    for r in rows[::3]:
        r["val_top1_best"] = np.nan  # ok cells whose validation was not recorded
    rows[1]["top1"] = np.nan
    rows[-1] |= {"top1": np.nan, "val_top1_best": np.nan, "confusion_matrix": None}
    write(root, rows)


def many_freeze_depths(root: Path) -> None:
    write(root, [row(c) for c in cells(models=("resnet18", "vgg16"), freezes=("none", "0.25", "0.5", "0.75", "10", "all"))])


def throughput_only(root: Path) -> None:
    write(root, [row(c, top1=None, val_top1_best=None, confusion_matrix=None, images_per_s=1000.0 * c.batch_size)
                 for c in cells(batch_size=(32, 64), mode=("throughput",))])


def labels_epochs_lr(root: Path) -> None:  # "how many labels do I need?", and the other axes a sweep may vary
    write(root, [row(c) for c in cells(train_subset=(100, 1000, None), epochs=(1, 3), lr=(0.01, 0.1))])


def cpu_only(root: Path) -> None:
    write(root, [row(c, gpu=False) for c in cells(models=("resnet18", "vgg16"), resolutions=(32, 64))])


def write(root: Path, rows: list[dict]) -> None:
    store = ResultStore(root)
    for r in rows:
        store.write(r, epochs(r))


# shape -> (writer, the plots it must draw); every other plot must say why it was skipped.
CURVES_CM = {"training_curves", "confusion_matrix"}
FRONTS = {"accuracy_vs_train_time", "accuracy_vs_latency", "accuracy_vs_vram"}
SHAPES = {
    "one model, two freeze depths": (one_model, FRONTS | CURVES_CM | {"freeze_depth"}),
    "one cell": (one_cell, CURVES_CM),
    "all cells failed": (all_failed, set()),
    "one seed": (one_seed, FRONTS | CURVES_CM | {"accuracy_vs_resolution"}),
    "NaN accuracies": (nan_accuracies, FRONTS | CURVES_CM | {"accuracy_vs_resolution"}),
    "one resolution, many freeze depths": (many_freeze_depths, FRONTS | CURVES_CM | {"freeze_depth"}),
    "throughput only": (throughput_only, {"vram_vs_batch_size"}),
    "labels, epochs and lr": (labels_epochs_lr, FRONTS | CURVES_CM | {"accuracy_vs_train_subset", "accuracy_by_axis"}),
    "CPU only": (cpu_only, {"accuracy_vs_train_time", "accuracy_vs_latency", "accuracy_vs_resolution"} | CURVES_CM),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_awkward_shapes(tmp_path, shape):
    writer, drawn = SHAPES[shape]
    writer(tmp_path / "results")
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    failures = [p for p in outcome.problems if " skipped: " in p]
    assert failures == []  # nothing raised: every plot and section either drew or said why not
    assert {p.stem for p in outcome.pngs} == drawn
    for key in PLOTS:
        figure = page.split(f'<figure id="plot-{key}">')[1].split("</figure>")[0]
        if key in drawn:
            assert 'src="data:image/png;base64,' in figure and f"]({key}.png)" in markdown
        else:
            assert '<p class="skipped">skipped: ' in figure
    assert markdown.index("## Which should I pick?") < markdown.index("## Leaderboard")


def test_the_shapes_say_what_they_lack(tmp_path):
    one_model(tmp_path / "a")
    markdown = build_report(tmp_path / "a", tmp_path / "a-out").markdown.read_text()
    assert "skipped: one input resolution only (32)" in markdown
    assert "## Per class: the recommended config" in markdown and "| dog | 60.00 | cat | 30.00 | 100 |" in markdown
    labels_epochs_lr(tmp_path / "b")
    markdown = build_report(tmp_path / "b", tmp_path / "b-out").markdown.read_text()
    for axis in ("train_subset", "epochs", "lr"):
        assert f"### Test top-1 (%) by model and {axis}, config chosen by validation" in markdown
    assert "| model | train_subset 100 | train_subset 1000 | train_subset all |" in markdown
    cpu_only(tmp_path / "c")
    markdown = build_report(tmp_path / "c", tmp_path / "c-out").markdown.read_text()
    assert "CPU-h" in markdown and "GPU-h" not in markdown
    assert "skipped: fewer than two configs with both validation accuracy and a VRAM figure (CPU runs record none)" in markdown


def test_a_plot_that_raises_is_one_line_and_the_rest_is_written(tmp_path, monkeypatch):
    one_seed(tmp_path / "results")

    def broken(data):
        raise ZeroDivisionError("float division by zero")

    keep = {k: PLOTS[k] for k in ("accuracy_vs_resolution", "confusion_matrix")}
    monkeypatch.setattr(report_plots, "PLOTS", {"broken": PlotSpec("A broken plot", broken), **keep})
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    line = "plot broken skipped: ZeroDivisionError: float division by zero"
    assert outcome.problems == [line]
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    assert line in markdown and line in page
    assert "](accuracy_vs_resolution.png)" in markdown and "](confusion_matrix.png)" in markdown
    assert "## All cells" in markdown


def test_a_section_that_raises_is_one_line_and_the_rest_is_written(tmp_path, monkeypatch):
    one_seed(tmp_path / "results")
    monkeypatch.setattr(report_plots, "PLOTS", {})

    def broken(data):
        raise KeyError("infer_latency_ms_p50")

    monkeypatch.setitem(report_sections.SECTIONS, "sweep", broken)  # the registry build_report walks
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    line = "section sweep skipped: KeyError: 'infer_latency_ms_p50'"
    assert outcome.problems == [line]
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    assert f"**{line}**" in markdown and line.replace("'", "&#39;") in page
    assert "## Leaderboard" in markdown and "## All cells" in markdown


def test_a_config_label_names_an_unset_value_as_its_axis_does():
    import pandas as pd

    from bench.report.tables import config_label

    row = pd.Series({"model": "tv:resnet18", "resolution": 32, "batch_size": 512, "freeze": "none",
                     "steps": pd.NA, "test_subset": None, "infer_budget_s": 4.0, "lr": 0.2})
    label = config_label(row, ["steps", "test_subset", "infer_budget_s", "lr"])
    assert label == "tv:resnet18 r32 bs512 freeze=none steps=no cap test_subset=all infer_budget_s=4 lr=0.2"


def test_weights_files_are_named_by_file_name_unless_two_share_one():
    import pandas as pd

    from bench.report.tables import config_label, weights_names

    assert weights_names(["/tmp/bench-x/lite0.pth", "/tmp/bench-x/lite1.pth", None, float("nan")]) == {
        "/tmp/bench-x/lite0.pth": "lite0.pth", "/tmp/bench-x/lite1.pth": "lite1.pth"}
    shared = weights_names(["/runs/a/best.pt", "/runs/b/best.pt"])  # a file name that does not tell them apart
    assert shared == {"/runs/a/best.pt": "/runs/a/best.pt", "/runs/b/best.pt": "/runs/b/best.pt"}
    row = pd.Series({"model": "tv:resnet18", "resolution": 32, "batch_size": 64, "freeze": "none",
                     "weights": "/tmp/bench-x/lite0.pth"})
    names = weights_names(["/tmp/bench-x/lite0.pth", "/tmp/bench-x/lite1.pth"])
    assert config_label(row, ["weights"], names) == "tv:resnet18 r32 bs64 freeze=none weights=lite0.pth"
    assert config_label(row, ["weights"]).endswith("weights=/tmp/bench-x/lite0.pth")


def test_an_axis_with_one_value_per_model_gets_no_panel_of_its_own(tmp_path):
    # Each model fine-tuned from its own weights file: 'weights' varies, but only with the model.
    rows = [row(c, weights=f"/ckpt/{c.model}.pth")
            for c in cells(models=("resnet18", "vgg16"), resolutions=(32, 64))]
    write(tmp_path / "results", rows)
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    markdown = outcome.markdown.read_text()
    assert "accuracy_by_axis" not in {p.stem for p in outcome.pngs}
    assert ("skipped: weights took one value per model among the ranked configs, so there is nothing to compare "
            "along it apart from the model") in markdown
