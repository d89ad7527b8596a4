"""The report stage, end to end: results written through `ResultStore.write`, reports checked against them."""

from __future__ import annotations

import datetime as dt
import html
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.errors import ResultsError
from bench.report import ReportOutcome, build_report
from bench.report import plots as report_plots
from bench.report.plots import PLOTS
from bench.report.sections import SECTIONS
from bench.report.tables import PIVOTS, pareto_front
from bench.store import ResultStore
from bench.suite import Cell

MODELS = {"resnet18": 0.80, "efficientnet_b0": 0.85, "convnext_tiny": 0.90}  # base test top-1 per model
VRAM = {"resnet18": 1000, "efficientnet_b0": 2200, "convnext_tiny": 1600}  # bytes per pixel of a batch
LATENCY_MS = {"resnet18": 1.5, "efficientnet_b0": 4.0, "convnext_tiny": 3.0}  # batch 1 at 64 px
DATA_BYTES = 150_000_000  # the resident dataset, inside peak_vram_allocated_bytes
PARAMS = {"resnet18": 11_689_512, "efficientnet_b0": 5_288_548, "convnext_tiny": 28_589_128}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
EVIL = "<script>alert(1)</script>"
# The grid varies no training-set size: tests/test_report_shapes.py draws that plot.
DRAWN = [key for key in PLOTS if key != "accuracy_vs_train_subset"]
OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB | GPU 0 has 79.1 GiB total | " + EVIL)


def top1_of(model: str, resolution: int, freeze: str, seed: int) -> float:
    """A known accuracy: higher resolution and fine-tuning help; seeds spread by ±0.01."""
    return MODELS[model] + (0.04 if resolution == 128 else 0.0) + (0.02 if freeze == "none" else 0.0) + 0.01 * (seed - 1)


def val_of(model: str, resolution: int, freeze: str, seed: int) -> float:
    """Validation agrees with test, except that resnet18's linear probe looks 3 pts better on validation than on
    test, enough to beat its fine-tune there: the report must follow validation, not test."""
    return top1_of(model, resolution, freeze, seed) + (0.03 if model == "resnet18" and freeze == "all" else 0.0)


def make_row(cell: Cell, run_id: str, when: dt.datetime, **overrides) -> dict:
    """A full result row like the runner writes: config, metrics, memory and provenance."""
    trainable = PARAMS[cell.model] if cell.freeze == "none" else 5_130
    row = {
        **cell.model_dump(), "freeze": str(cell.freeze), "run_id": run_id, "suite_hash": "abc", "cell_id": cell.id,
        "group_id": cell.group_id, "status": "ok", "error": None, "cell_json": cell.canonical(),
        "num_classes": 10, "train_images": 45_000, "val_images": 5_000, "test_images": 10_000, "loader": "device",
        "trainable_params": trainable, "total_params": PARAMS[cell.model], "frozen_layers": 0, "total_layers": 50,
        "flops_per_image": int(1.8e9 * (cell.resolution / 224) ** 2),
        "top1": top1_of(cell.model, cell.resolution, str(cell.freeze), cell.seed), "top5": 0.99,
        "val_top1_best": val_of(cell.model, cell.resolution, str(cell.freeze), cell.seed), "val_top1_final": 0.9,
        "train_loss_final": 0.3, "val_loss_final": 0.4,
        "epochs_run": 3, "steps_run": 300, "class_names": CLASSES,
        "confusion_matrix": (np.eye(10, dtype=int) * 90 + 1).tolist(),
        "wall_s": 100.0, "setup_s": 2.0, "compile_s": 0.0, "eval_s": 3.0, "warmup_s": 1.0, "warmup_steps": 5,
        "train_s": (30.0 if cell.freeze == "all" else 90.0) * cell.resolution / 64 + cell.seed,
        "images_per_s": 4000.0 * 64 / cell.resolution * (cell.batch_size / 32) ** 0.3,
        "peak_vram_allocated_bytes": int(cell.batch_size * cell.resolution**2 * VRAM[cell.model]),
        "peak_vram_reserved_bytes": None, "peak_vram_nvml_bytes": None, "peak_host_rss_bytes": 3 * 2**30,
        "peak_host_pss_bytes": 2 * 2**30, "concurrent_cells": 1,
        "peak_vram_process_bytes": int(cell.batch_size * cell.resolution**2 * VRAM[cell.model]) + 600 * 2**20,
        "data_device_bytes": DATA_BYTES,
        "peak_vram_train_bytes": int(cell.batch_size * cell.resolution**2 * VRAM[cell.model]) - DATA_BYTES // 10,
        "infer_latency_ms_p50": LATENCY_MS[cell.model] * cell.resolution / 64,
        "infer_latency_ms_p95": 1.2 * LATENCY_MS[cell.model] * cell.resolution / 64,
        "infer_images_per_s": 12_000.0 * 64 / cell.resolution, "infer_peak_vram_bytes": 4 * PARAMS[cell.model] + 2**20,
        "model_bytes": 4 * PARAMS[cell.model],
        "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "driver_version": "550.54",
        "cuda_version": "12.4", "torch_version": "2.4.0", "torchvision_version": "0.19.0", "hostname": "node-a",
        "bench_version": "0.1.0", "git_commit": "1234abc", "started_at": when - dt.timedelta(seconds=100),
        "finished_at": when,
    }
    return {**row, **overrides}


def epochs_of(row: dict) -> list[dict]:
    if row["status"] != "ok" or row["mode"] != "train":
        return []
    err = 1 - row["top1"]
    return [{"epoch": e, "step": 100 * (e + 1), "lr": 0.01, "train_loss": 10 * err / (e + 1), "train_top1": 0.5 + 0.1 * e,
             "val_loss": 12 * err / (e + 1), "val_top1": row["top1"] - 0.05 * (2 - e), "epoch_s": 10.0,
             "images_per_s": row["images_per_s"]} for e in range(3)]


def grid_cells(suite: str = "transfer") -> list[Cell]:
    axes = itertools.product(MODELS, (64, 128), (32, 128), ("none", "all"), (0, 1, 2))
    return [Cell(suite=suite, dataset="cifar10", model=m, resolution=r, batch_size=b, freeze=f, seed=s)
            for m, r, b, f, s in axes]


FAILED = dict(model="convnext_tiny", resolution=128, batch_size=128, freeze="none", seed=2)
# Every seed of these configs: a change in one seed alone is inside the seeds' spread (tests/test_report_selection.py).
DROPPED = dict(model="efficientnet_b0", resolution=64, batch_size=32, freeze="all")  # top1 falls in run 2
SLOWED = dict(model="resnet18", resolution=64, batch_size=128, freeze="none")  # images/s falls in run 2


def matches(cell: Cell, spec: dict) -> bool:
    return all(str(getattr(cell, k)) == str(v) for k, v in spec.items())


def write_run(store: ResultStore, run_id: str, when: dt.datetime, *, regress: bool) -> list[dict]:
    rows = []
    for i, cell in enumerate(grid_cells()):
        row = make_row(cell, run_id, when + dt.timedelta(minutes=i))
        if regress and matches(cell, DROPPED):
            row["top1"] -= 0.05
        if regress and matches(cell, SLOWED):
            row["images_per_s"] *= 0.5
        if matches(cell, FAILED):
            row.update(status="oom", error=OOM, top1=None, top5=None, val_top1_best=None, train_s=None,
                       confusion_matrix=None)
        rows.append(row)
    for bs in (64, 256):  # speed-only cells
        cell = Cell(suite="transfer", dataset="cifar10", model="resnet18", batch_size=bs, mode="throughput")
        rows.append(make_row(cell, run_id, when, top1=None, top5=None, confusion_matrix=None, images_per_s=9000.0 * bs / 64))
    for row in rows:
        store.write(row, epochs_of(row))
    return rows


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run r1 of the suite, then run r2 with one top1 drop and one images/s drop; returns r2's rows."""
    root = tmp_path_factory.mktemp("two_runs") / "results"
    store = ResultStore(root)
    write_run(store, "r1", T0, regress=False)
    return root, write_run(store, "r2", T0 + dt.timedelta(days=30), regress=True)


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory) -> tuple[ReportOutcome, str, str, list[dict]]:
    results, rows = two_runs
    outcome = build_report(results, tmp_path_factory.mktemp("report"))
    return outcome, outcome.markdown.read_text(), outcome.html.read_text(), rows


def md_table_after(markdown: str, heading: str) -> list[dict[str, str]]:
    """The first pipe table after `heading`, as dicts keyed by the header (escaped pipes kept inside cells)."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    split = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    return [dict(zip(split[0], row)) for row in split[2:]]


def trained_ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and r["mode"] == "train"]


# ---------------------------------------------------------------- the main report


def test_report_files_and_outcome(report):
    outcome, markdown, page, rows = report
    assert outcome.markdown.name == "leaderboard.md" and outcome.html.name == "leaderboard.html"
    assert outcome.rows == len(rows) == 74
    assert outcome.problems == []
    assert sorted(p.name for p in outcome.pngs) == sorted(f"{key}.png" for key in DRAWN)
    assert all(p.parent == outcome.markdown.parent and p.stat().st_size > 10_000 for p in outcome.pngs)


def test_leaderboard_folds_seeds_into_mean_std_n_sorted_by_validation(report):
    _, markdown, page, rows = report
    tests: dict[str, list[float]] = {}
    vals: dict[str, list[float]] = {}
    for r in trained_ok(rows):
        tests.setdefault(r["group_id"], []).append(r["top1"])
        vals.setdefault(r["group_id"], []).append(r["val_top1_best"])
    table = md_table_after(markdown, "## Leaderboard")
    assert len(table) == len(tests) == 24
    for line in table:
        test, val = np.array(tests[line["config id"]]), np.array(vals[line["config id"]])
        assert line["test top-1 % (reported)"] == f"{100 * test.mean():.2f} ± {100 * test.std(ddof=1):.2f}"
        assert line["val top-1 % (selects)"] == f"{100 * val.mean():.2f} ± {100 * val.std(ddof=1):.2f}"
        assert line["n"].split()[0] == str(len(test))
    val_means = [np.mean(vals[line["config id"]]) for line in table]
    assert val_means == sorted(val_means, reverse=True)
    assert [line["#"] for line in table] == [str(i) for i in range(1, 25)]
    # Validation disagrees with test for resnet18: its probe ranks above its fine-tune, though test says otherwise.
    order = [(line["model"], line["resolution"], line["freeze"]) for line in table]
    for res in ("64", "128"):
        assert order.index(("resnet18", res, "all")) < order.index(("resnet18", res, "none"))
    test_means = [np.mean(tests[line["config id"]]) for line in table]
    assert test_means != sorted(test_means, reverse=True)
    # The config that lost a seed to the OOM says so, and its mean is over the two seeds that finished.
    failed_group = next(r["group_id"] for r in rows if r["status"] == "oom")
    assert next(line for line in table if line["config id"] == failed_group)["n"] == "2 (+1 failed)"
    assert val_means[0] == pytest.approx(val_of("convnext_tiny", 128, "none", 1))
    assert "chosen on validation, reported on test" in markdown.lower()


def test_leaderboard_units(report):
    _, markdown, _, _ = report
    first = md_table_after(markdown, "## Leaderboard")[0]  # convnext_tiny r128 bs32 freeze=none
    assert (first["model"], first["resolution"], first["batch_size"], first["freeze"]) == ("convnext_tiny", "128", "32", "none")
    assert first["peak VRAM"] == f"{32 * 128**2 * VRAM['convnext_tiny'] / 2**20:.0f} MiB"
    assert first["peak host RAM"] == "2.00 GiB"  # PSS, not the RSS (3 GiB) that counts shared pages per process
    assert first["VRAM on the card"] == f"{(32 * 128**2 * VRAM['convnext_tiny'] + 600 * 2**20) / 2**30:.2f} GiB"
    assert first["train time"] == "3.0 min"  # seeds: 180, 181, 182 s
    assert first["trainable params"] == "28.59 M" and first["GFLOPs/image"] == f"{1.8 * (128 / 224) ** 2:.2f}"


def test_every_cell_in_markdown_and_html(report):
    _, markdown, page, rows = report
    for r in rows:
        assert r["cell_id"] in markdown and r["cell_id"] in page


def test_failed_cell_listed_with_status_and_escaped_message(report):
    _, markdown, page, rows = report
    failed = next(r for r in rows if r["status"] == "oom")
    (line,) = md_table_after(markdown, "## Failed cells")
    assert (line["status"], line["cell id"], line["error"].replace("\\", "")) == ("oom", failed["cell_id"], OOM)
    assert "GiB \\| GPU 0" in markdown and "\\<script\\>" in markdown  # pipes cannot split the row
    assert html.escape(OOM, quote=False) in page and EVIL not in page


def test_throughput_cells_get_their_own_table(report):
    _, markdown, _, _ = report
    speed = md_table_after(markdown, "## Throughput")
    assert [line["images/s (mean ± std)"] for line in speed] == ["36,000", "9,000"]
    assert [line["batch_size"] for line in speed] == ["256", "64"]
    assert len(md_table_after(markdown, "## Leaderboard")) == 24  # not ranked by accuracy


def test_pivot_is_test_of_the_config_validation_chose(report):
    _, markdown, _, _ = report
    pivot = {line["model"]: line for line in md_table_after(markdown, "### Test top-1 (%) by model and resolution")}
    for model in MODELS:
        chosen = "all" if model == "resnet18" else "none"  # resnet18: validation prefers the probe, test the fine-tune
        for res in (64, 128):
            assert pivot[model][f"resolution {res}"] == f"{100 * top1_of(model, res, chosen, 1):.2f}"


def test_regressions_flagged_at_the_top(report):
    outcome, markdown, page, rows = report
    dropped = next(r for r in rows if all(str(r[k]) == str(v) for k, v in DROPPED.items()))
    slowed = next(r for r in rows if all(str(r[k]) == str(v) for k, v in SLOWED.items()))
    assert len(outcome.regressions) == 2  # one line per config, its three seeds folded
    assert any(dropped["group_id"] in line and "top1 -5.00 pts" in line and "3 seeds" in line
               for line in outcome.regressions)
    assert any(slowed["group_id"] in line and "images/s -50.0%" in line for line in outcome.regressions)
    assert markdown.index("Regressions (2)") < markdown.index("## Leaderboard")
    assert page.index('id="regressions"') < page.index('id="leaderboard"')
    assert "Compared with transfer: run r1" in markdown


def test_pareto_table_matches_brute_force(report):
    _, markdown, _, rows = report
    groups: dict[str, list[dict]] = {}
    for r in trained_ok(rows):
        groups.setdefault(r["group_id"], []).append(r)
    # The front is a choice, so validation draws it.
    points = {g: (np.mean([r["train_s"] for r in rs]), np.mean([r["val_top1_best"] for r in rs])) for g, rs in groups.items()}
    expected = {g for g, (t, a) in points.items()
                if not any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for t2, a2 in points.values())}
    assert {line["config id"] for line in md_table_after(markdown, "### Pareto front")} == expected


@pytest.mark.parametrize("key", list(SECTIONS))
def test_every_section_in_both_reports(report, key):
    _, markdown, page, _ = report
    if key == "race":  # shown only over raced rows (tests/test_report_race.py); this grid was not raced
        assert '<section id="race">' not in page and "## Race" not in markdown
        return
    assert f'<section id="{key}">' in page
    title = page.split(f'<section id="{key}">')[1].split("<h2>")[1].split("</h2>")[0]
    assert f"## {html.unescape(title)}" in markdown


@pytest.mark.parametrize("key", DRAWN)
def test_every_plot_drawn_and_embedded(report, key):
    outcome, markdown, page, _ = report
    assert f"]({key}.png)" in markdown
    figure = page.split(f'<figure id="plot-{key}">')[1].split("</figure>")[0]
    assert 'src="data:image/png;base64,' in figure


def test_html_is_self_contained(report):
    _, _, page, _ = report
    # One inline script (sorting the tables), nothing loaded from anywhere.
    assert page.count("<script") == 1 and "<script>" in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(DRAWN) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page


# ---------------------------------------------------------------- units


def test_pareto_front_hand_made():
    # cost: train seconds (lower is better), gain: top1 (higher is better)
    cost = np.array([10.0, 20.0, 20.0, 30.0, 15.0, 40.0, 5.0, np.nan, 30.0])
    gain = np.array([0.80, 0.90, 0.85, 0.90, 0.80, 0.95, 0.70, 0.99, 0.90])
    # 0 front; 1 front; 2 dominated by 1; 3 dominated by 1 (slower, same accuracy); 4 dominated by 0;
    # 5 front (best accuracy); 6 front (fastest); 7 NaN never; 8 equal to 3 and also dominated by 1.
    assert pareto_front(cost, gain).tolist() == [True, True, False, False, False, True, True, False, False]
    # Identical points do not dominate each other: both stay on the front.
    assert pareto_front(np.array([1.0, 1.0]), np.array([0.5, 0.5])).tolist() == [True, True]
    assert pareto_front(np.array([]), np.array([])).tolist() == []


def test_markdown_escaping():
    from bench.report.render import md

    assert md("a|b <script>x</script>\n*c*") == r"a\|b \<script\>x\</script\> \*c\*"


# ---------------------------------------------------------------- selection: runs, reruns, filters


def small_run(store: ResultStore, run_id: str, when: dt.datetime, cells: list[Cell], **overrides) -> list[dict]:
    rows = [make_row(c, run_id, when + dt.timedelta(seconds=i), **overrides) for i, c in enumerate(cells)]
    for row in rows:
        store.write(row, epochs_of(row))
    return rows


def test_latest_row_per_cell_and_previous_run(tmp_path):
    from bench.report.select import select_rows

    store = ResultStore(tmp_path)
    cells = grid_cells()[:6]
    small_run(store, "zz-first", T0, cells)  # run ids do not sort by time: finished_at decides
    small_run(store, "aa-second", T0 + dt.timedelta(days=1), cells)
    small_run(store, "mm-rerun", T0 + dt.timedelta(days=2), cells[:2], top1=0.5)  # `bench run --rerun` of two cells
    read = store.read()
    chosen = select_rows(read.cells, read.epochs, str(tmp_path))
    by_cell = dict(zip(chosen.current["cell_id"], chosen.current["run_id"]))
    assert by_cell == {c.id: ("mm-rerun" if i < 2 else "aa-second") for i, c in enumerate(cells)}
    # Previous run: the newest run that provided none of the shown rows and shares cells with them.
    assert chosen.baseline_runs == {"transfer": "zz-first"}
    assert set(chosen.baseline["run_id"]) == {"zz-first"} and len(chosen.baseline) == 6
    # --run on the middle run: its baseline is the run before it, never a later one.
    middle = select_rows(read.cells, read.epochs, str(tmp_path), run="aa-second")
    assert set(middle.current["run_id"]) == {"aa-second"} and middle.baseline_runs == {"transfer": "zz-first"}
    assert select_rows(read.cells, read.epochs, str(tmp_path), run="zz-first").baseline_runs == {}
    small_run(store, "other-1", T0, [Cell(suite="other", model="resnet18")])
    read = store.read()
    with pytest.raises(ResultsError, match="pass --compare a run of the same suite"):
        select_rows(read.cells, read.epochs, str(tmp_path), suite="transfer", compare="other-1")


def test_run_compare_and_unknown_names(two_runs, tmp_path, monkeypatch):
    results, _ = two_runs
    monkeypatch.setattr(report_plots, "PLOTS", {})  # the plots are checked on the main report; keep this test fast
    old = build_report(results, tmp_path / "r1", run="r1")
    assert old.regressions == [] and old.rows == 74
    assert "No earlier run" in old.markdown.read_text()
    # Comparing r1 against r2 explicitly: the drops of r2 read as gains, nothing is flagged.
    reverse = build_report(results, tmp_path / "rev", run="r1", compare="r2")
    assert reverse.regressions == [] and "Compared with transfer: run r2" in reverse.markdown.read_text()
    with pytest.raises(ResultsError, match="did you mean: transfer"):
        build_report(results, tmp_path / "x", suite="transfr")
    with pytest.raises(ResultsError, match="no results for run 'r3'"):
        build_report(results, tmp_path / "x", compare="r3")


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_empty_results_folder_raises(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match=rf"no results in .*{folder}; run `bench run SUITE` first"):
        build_report(tmp_path / folder, tmp_path / "out")


# ---------------------------------------------------------------- hostile and messy folders


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[ReportOutcome, str, str, Path]:
    """A suite and a model named like markup, rows from two machines, a corrupt and a foreign Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("messy") / "results"
    store = ResultStore(root)
    suite = '<img src=x onerror="alert(1)">'  # the store keeps a suite in a folder name, so no '/' in it
    cells = [Cell(suite=suite, model=m, resolution=r, seed=s) for m in ("resnet18", EVIL) for r in (32, 64) for s in (0, 1)]
    for i, cell in enumerate(cells):
        model = "resnet18"  # the helper's tables are keyed by real names; the row keeps the hostile one
        row = make_row(cell.model_copy(update={"model": model}), "run-1", T0 + dt.timedelta(seconds=i))
        row |= {"model": cell.model, "suite": suite, "cell_id": cell.id, "group_id": cell.group_id}
        if i % 2:
            row |= {"hostname": "node-b", "torch_version": "2.5.1", "gpu_name": "NVIDIA A100-SXM4-40GB"}
        store.write(row, epochs_of(row))
    cells_dir = next(root.glob("*/cells"))
    (cells_dir / "corrupt.parquet").write_bytes(np.random.default_rng(0).bytes(2048))
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["a", "b"]}), cells_dir / "foreign.parquet")
    outcome = build_report(root, tmp_path_factory.mktemp("messy_out"))
    return outcome, outcome.markdown.read_text(), outcome.html.read_text(), cells_dir


def test_markup_in_names_is_escaped_in_html(messy):
    outcome, markdown, page, _ = messy
    assert EVIL not in page and "<img src=x" not in page
    assert html.escape(EVIL, quote=False) in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "\\<script\\>alert(1)\\</script\\>" in markdown and "<script>" not in markdown


def test_corrupt_and_foreign_files_listed_and_report_still_built(messy):
    outcome, markdown, page, cells_dir = messy
    assert outcome.rows == 8
    for name in ("corrupt.parquet", "foreign.parquet"):
        assert any(name in p for p in outcome.problems)
        assert name in markdown and name in page
    assert any("not a readable Parquet file" in p for p in outcome.problems)
    assert any("not a bench results file" in p for p in outcome.problems)


def test_mixed_machines_warned(messy):
    outcome, markdown, page, _ = messy
    (warning,) = [p for p in outcome.problems if "different machines" in p]
    assert "hostname: node-a (4 cells); node-b (4 cells)" in warning and "torch_version" in warning
    assert 'id="warnings"' in page and "node-b (4 cells)" in page
    assert markdown.index("## ⚠ Warnings") < markdown.index("## Leaderboard")


def test_degenerate_grid_skips_with_notes(tmp_path):
    """One model, one setting, one ok cell and one failure, no epochs, no VRAM (CPU): nothing may crash."""
    store = ResultStore(tmp_path / "results")
    ok, bad = Cell(suite="tiny", model="resnet18", seed=0), Cell(suite="tiny", model="resnet18", seed=1)
    cpu = dict(device="cpu", gpu_name=None, peak_vram_allocated_bytes=None, confusion_matrix=None)
    store.write(make_row(ok, "run-1", T0, **cpu), [])
    store.write(make_row(bad, "run-1", T0, status="error", error="RuntimeError: boom", top1=None, **cpu), [])
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    markdown = outcome.markdown.read_text()
    assert outcome.pngs == [] and outcome.rows == 2
    for key in PLOTS:
        assert f"{key}.png" not in markdown
    assert markdown.count("_skipped: ") == len(PLOTS)
    assert markdown.count(": skipped, one ") == len(PIVOTS)
    assert "RuntimeError: boom" in markdown and "peak VRAM" not in md_table_after(markdown, "## Leaderboard")[0]


# ---------------------------------------------------------------- the HTML in a real browser


def chromium(page: Path, tmp_path: Path, height: int = 2000) -> tuple[Path, str]:
    """The page rendered in headless Chromium: a screenshot 1400 px wide, and the DOM after its scripts ran."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the HTML was not rendered in a browser")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1400,{height}"]
    url = page.resolve().as_uri()
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=90)
    dom = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=90).stdout
    return shot, dom


def colours(shot: Path) -> int:
    """How many colours the screenshot has: a blank or unstyled page has a handful."""
    from PIL import Image

    with Image.open(shot) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_html_renders_in_headless_chromium(report, tmp_path):
    outcome = report[0]
    shot, dom = chromium(outcome.html, tmp_path)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
    assert colours(shot) > 50  # text, tables and colour, not blank
    assert dom.count("<table") >= 8 and 'id="leaderboard"' in dom
    images = re.findall(r'<img [^>]*src="(data:image/png;base64,[^"]{1000,})"', dom)
    assert len(images) == len(outcome.pngs)


# ---------------------------------------------------------------- failed cells beside a sweep (issue 25)

SWEPT = ("resnet18", "convnext_tiny")
LR_GAIN = {0.01: 0.0, 0.1: 0.02}  # the larger rate is better by 2 pts, on validation and test
SWEEP_FAILED = {("convnext_tiny", 0.1, 1): "oom", ("resnet18", 0.01, 0): "error"}


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory) -> tuple[ReportOutcome, str, Path]:
    """An lr sweep where some cells failed: the ok rows hold the precision and cudnn_benchmark their run resolved
    (fp32, False), the failed rows the cells' own (auto, True), as a real CPU or older-GPU run writes them."""
    root = tmp_path_factory.mktemp("failed_sweep") / "results"
    store = ResultStore(root)
    for i, (model, lr, seed) in enumerate(itertools.product(SWEPT, LR_GAIN, (0, 1))):
        cell = Cell(suite="sweep", dataset="cifar10", model=model, resolution=64, batch_size=32, lr=lr, seed=seed)
        row = make_row(cell, "run-1", T0 + dt.timedelta(minutes=i), precision="fp32", cudnn_benchmark=False)
        row["top1"] += LR_GAIN[lr]
        row["val_top1_best"] += LR_GAIN[lr]
        failed = SWEEP_FAILED.get((model, lr, seed))
        if failed:  # the cell's own settings: nothing ran far enough to resolve them
            row = make_row(cell, "run-1", T0 + dt.timedelta(minutes=i), status=failed, error=OOM if failed == "oom"
                           else "RuntimeError: loss is NaN", top1=None, top5=None, val_top1_best=None, train_s=None,
                           confusion_matrix=None)
            assert (row["precision"], row["cudnn_benchmark"]) == ("auto", True)
        store.write(row, epochs_of(row))
    outcome = build_report(root, tmp_path_factory.mktemp("failed_sweep_out"))
    return outcome, outcome.markdown.read_text(), root


def test_unresolved_values_of_failed_rows_do_not_make_a_setting_vary(failed_sweep):
    outcome, markdown, _ = failed_sweep
    for name in ("precision", "cudnn_benchmark"):  # in no label, table or legend
        assert name not in markdown, name
    failed = md_table_after(markdown, "## Failed cells")
    assert sorted(r["status"] for r in failed) == ["error", "oom"]
    assert {r["config"] for r in failed} == {"resnet18 r64 bs32 freeze=none lr=0.01", "convnext_tiny r64 bs32 freeze=none lr=0.1"}
    # The sweep folds: one leaderboard row per model, at the rate validation chose.
    board = md_table_after(markdown, "## Leaderboard")
    assert [r["tuned (chosen by val)"] for r in board] == ["lr 0.1 (best of 2)"] * 2


def test_the_axis_plot_keeps_its_title_and_labels_inside_the_png(failed_sweep):
    """One panel (lr) under a title longer than the figure is wide: the title wraps inside the figure, and the
    PNG holds everything drawn (its title and its y label were cut off at the left edge)."""
    import matplotlib as mpl
    from matplotlib.text import Text

    from bench.report import along
    from bench.report.build import load
    from bench.report.plotkit import PNG_DPI, RC, png

    data = load(failed_sweep[2]).data
    with mpl.rc_context(RC):
        fig = along.accuracy_by_axis(data)
        image = png(fig)
        renderer = fig.canvas.get_renderer()
        (title,) = [t for t in fig.findobj(Text) if t.get_text().startswith("Accuracy along")]
        extent = title.get_window_extent(renderer)
        drawn = fig.get_tightbbox(renderer)  # inches
    assert 0 <= extent.x0 and extent.x1 <= fig.bbox.width
    width, height = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")  # the IHDR
    assert width >= drawn.width * PNG_DPI - 1 and height >= drawn.height * PNG_DPI - 1


def test_varying_compares_resolved_fields_like_with_like():
    import pandas as pd

    from bench.report.tables import varying

    rows = pd.DataFrame({"status": ["ok", "ok", "oom", "dropped"], "precision": ["bf16", "bf16", "auto", "bf16"],
                         "cudnn_benchmark": [False, False, True, False], "lr": [0.01, 0.01, None, 0.01],
                         "optimizer": ["sgd", "sgd", "adamw", "sgd"]})
    assert varying(rows, ["precision", "cudnn_benchmark", "lr", "optimizer"]) == ["optimizer"]  # not resolved: as is
    # A value the suite wrote out is a setting, failed or not; among finished rows, a resolved field still varies.
    assert varying(rows.assign(lr=[0.01, 0.01, 0.1, 0.01]), ["lr"]) == ["lr"]
    assert varying(rows.assign(precision=["bf16", "fp32", "auto", "bf16"]), ["precision"]) == ["precision"]
    # Nothing finished: every value is as written, compared as such.
    assert varying(rows.assign(status="error", precision=["auto", "fp16", "auto", "auto"]), ["precision"]) == ["precision"]


def test_a_report_with_failed_cells_and_a_sweep_renders_in_chromium(failed_sweep, tmp_path):
    outcome, _, _ = failed_sweep
    shot, dom = chromium(outcome.html, tmp_path, height=3000)
    shutil.copy(shot, outcome.html.parent / "chromium.png")  # kept beside the report, to look at
    assert colours(shot) > 50
    for key in ("recommend", "leaderboard", "sweep", "failed", "plots", "cells"):
        assert f'<section id="{key}">' in dom, key
    sweep = dom.split('<section id="sweep">')[1].split("</section>")[0]
    assert sweep.count("<tr") == 1 + 2 * len(LR_GAIN)  # the header, and every rate tried for both models
    failed = dom.split('<section id="failed">')[1].split("</section>")[0]
    assert "loss is NaN" in failed and html.escape(EVIL, quote=False) in failed and "<script>alert" not in dom
    images = re.findall(r'<img [^>]*src="(data:image/png;base64,[^"]{1000,})"', dom)
    assert len(images) == len(outcome.pngs) > 0
    assert "precision" not in dom and "cudnn_benchmark" not in dom


@pytest.mark.parametrize("scenario", ["all failed", "throughput only"])
def test_reports_without_a_leaderboard(tmp_path, scenario):
    store = ResultStore(tmp_path / "results")
    for seed in (0, 1):
        if scenario == "all failed":
            cell = Cell(suite="s", model="resnet18", seed=seed)
            row = make_row(cell, "run-1", T0, status="timeout", error=f"cell {seed} ran past 600 s", top1=None)
        else:
            cell = Cell(suite="s", model="resnet18", seed=seed, batch_size=64 * (seed + 1), mode="throughput")
            row = make_row(cell, "run-1", T0, top1=None, confusion_matrix=None)
        store.write(row, epochs_of(row))
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    markdown = outcome.markdown.read_text()
    assert "nothing to rank yet" in markdown and outcome.rows == 2
    if scenario == "all failed":
        assert [line["status"] for line in md_table_after(markdown, "## Failed cells")] == ["timeout", "timeout"]
    else:
        assert len(md_table_after(markdown, "## Throughput")) == 2
        assert [p.name for p in outcome.pngs] == ["vram_vs_batch_size.png"]
