"""Choose on validation, report test; sweeps folded per backbone; regressions beyond the seeds' noise; McNemar.

Rows are written through `ResultStore.write` with only the columns each case needs (the store leaves the rest
empty, as in rows from an older bench), so every expectation below follows from the numbers written here.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bench.report import build_report
from bench.report import plots as report_plots
from bench.report.compare import compare_runs
from bench.report.context import ReportData, make_context
from bench.report.select import select_rows
from bench.report.stats import ALPHA, EXACT_MAX, decode_correct, holm, mcnemar_p
from bench.store import ResultStore
from bench.suite import Cell

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
N_TEST = 1000
CLASSES = ["a", "b"]


def pack(correct: np.ndarray) -> str:
    """What the worker stores in `test_correct` (bench.train.metrics.pack_correct), without importing torch."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def right_on(count: int, start: int = 0) -> np.ndarray:
    """A cell that got test images start .. start+count-1 right (of N_TEST)."""
    v = np.zeros(N_TEST, dtype=bool)
    v[start:start + count] = True
    return v


def write(store: ResultStore, cell: Cell, *, top1: float | None, val: float | None, run: str = "r1",
          when: dt.datetime = T0, correct: np.ndarray | None = None, **extra) -> dict:
    """One ok row with only what the report needs; every other column is empty, as in an older bench's rows."""
    row = {
        **cell.model_dump(), "freeze": str(cell.freeze), "run_id": run, "cell_id": cell.id, "group_id": cell.group_id,
        "status": "ok", "top1": top1, "val_top1_best": val, "test_images": N_TEST, "train_s": 10.0,
        "images_per_s": 100.0, "started_at": when, "finished_at": when, "class_names": CLASSES,
        "test_correct": None if correct is None else pack(correct), **extra,
    }
    store.write(row, [])
    return row


def context(root: Path, **kwargs) -> ReportData:
    read = ResultStore(root).read()
    return make_context(select_rows(read.cells, read.epochs, str(root), **kwargs), top1_drop=0.01, speed_drop=0.10)


def cell(model: str = "resnet18", **fields) -> Cell:
    return Cell(suite="sel", dataset="cifar10", model=model, **fields)


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTS", {})  # plots are drawn by tests/test_report.py; keep these fast


def md_rows(markdown: str, heading: str) -> list[dict[str, str]]:
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    split = [[c.strip() for c in line.split(" | ")] for line in table]
    split = [[row[0].lstrip("| ")] + row[1:-1] + [row[-1].rstrip(" |")] for row in split]
    return [dict(zip(split[0], row)) for row in split[2:]]


# ---------------------------------------------------------------- validation chooses, test is reported


@pytest.fixture
def disagree(tmp_path) -> Path:
    """Validation prefers vgg16; test prefers resnet50 (and its seed 1 is the single luckiest test score)."""
    store = ResultStore(tmp_path / "results")
    vals = {"vgg16": (0.90, 0.92), "resnet50": (0.88, 0.89)}
    tests = {"vgg16": (0.80, 0.81), "resnet50": (0.90, 0.93)}
    for model, seed in itertools.product(vals, (0, 1)):
        matrix = [[40 + 10 * seed, 10], [5, 45]] if model == "vgg16" else [[50, 0], [0, 50]]
        write(store, cell(model, seed=seed, resolution=32), top1=tests[model][seed], val=vals[model][seed],
              confusion_matrix=matrix)
        # A second resolution, so the plots that choose per point have something to choose among.
        write(store, cell(model, seed=seed, resolution=64), top1=tests[model][seed] - 0.05,
              val=vals[model][seed] - 0.05, train_s=5.0)
    return tmp_path / "results"


def test_leaderboard_and_every_choice_follow_validation(disagree, no_plots, tmp_path):
    data = context(disagree)
    board = data.leaderboard
    assert list(board["model"]) == ["vgg16", "resnet50", "vgg16", "resnet50"]
    assert list(board["resolution"]) == [32, 32, 64, 64]
    assert board["top1_mean"].iloc[0] == pytest.approx(0.805)  # the chosen config's test, not the best test
    from bench.report import tables

    assert list(tables.best_per(data.leaderboard, ["resolution"])["model"]) == ["vgg16", "vgg16"]
    front = tables.pareto_rows(data.leaderboard)  # resnet50 has the better test scores, and is on no front
    assert list(zip(front["model"], front["resolution"])) == [("vgg16", 64), ("vgg16", 32)]
    markdown = build_report(disagree, tmp_path / "out").markdown.read_text()
    first = md_rows(markdown, "## Leaderboard")[0]
    assert (first["#"], first["model"], first["val top-1 % (selects)"], first["test top-1 % (reported)"]) == (
        "1", "vgg16", "91.00 ± 1.41", "80.50 ± 0.71")
    pivot = md_rows(markdown, "### Test top-1 (%) by model and resolution")
    assert {line["model"]: line["resolution 32"] for line in pivot} == {"resnet50": "91.50", "vgg16": "80.50"}


def test_confusion_matrix_is_the_chosen_config_summed_over_seeds(disagree):
    data = context(disagree)
    fig = report_plots.confusion_matrix(data)
    title = fig.axes[0].get_title().replace("\n", " ")
    # vgg16 r32, seeds summed: [[90, 20], [10, 90]] -> 180 of 210 right; not resnet50's lucky seed.
    assert "vgg16 r32" in title and "2 seed(s) summed" in title and f"{100 * 180 / 210:.2f}%" in title


# ---------------------------------------------------------------- sweeps fold into one row per backbone


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two backbones x three learning rates x two seeds; validation and test disagree on the best rate."""
    store = ResultStore(tmp_path / "results")
    best_val = {"resnet18": 0.01, "convnext_tiny": 0.003}
    best_test = {"resnet18": 0.03, "convnext_tiny": 0.01}
    for model, lr, seed in itertools.product(best_val, (0.003, 0.01, 0.03), (0, 1)):
        val = 0.80 + (0.05 if lr == best_val[model] else 0) + (0.1 if model == "convnext_tiny" else 0) + 0.002 * seed
        top1 = 0.78 + (0.05 if lr == best_test[model] else 0) + (0.1 if model == "convnext_tiny" else 0)
        write(store, cell(model, lr=lr, seed=seed), top1=top1, val=val)
    return tmp_path / "results"


def test_lr_sweep_folds_into_one_row_per_backbone_at_its_validation_choice(sweep, no_plots, tmp_path):
    data = context(sweep)
    board = data.leaderboard
    assert data.tuned == ["lr"] and len(data.configs) == 6
    assert list(board["model"]) == ["convnext_tiny", "resnet18"]
    assert list(board["lr"]) == [0.003, 0.01] and list(board["tried"]) == [3, 3]
    assert board["top1_mean"].tolist() == pytest.approx([0.88, 0.78])  # the test of the rate validation chose
    assert all(len(c) == 3 and c[0] == g for c, g in zip(board["candidates"], board["group_id"]))
    markdown = build_report(sweep, tmp_path / "out").markdown.read_text()
    rows = md_rows(markdown, "## Leaderboard")
    assert [r["tuned (chosen by val)"] for r in rows] == ["lr 0.003 (best of 3)", "lr 0.01 (best of 3)"]
    assert "lr" not in rows[0]  # the swept value is in the tuned column, not a column of its own
    chosen = [Cell(suite="sel", dataset="cifar10", model="convnext_tiny", lr=0.003, seed=s).id for s in (0, 1)]
    assert rows[0]["cell ids"] == ", ".join(sorted(chosen))
    swept = md_rows(markdown, "## Hyperparameter sweeps")
    assert len(swept) == 6 and [r["chosen"] for r in swept].count("✓") == 2
    assert [(r["lr"], r["chosen"]) for r in swept[:3]] == [("0.003", "✓"), ("0.01", ""), ("0.03", "")]


def test_a_sweep_without_validation_is_not_folded(tmp_path, no_plots):
    store = ResultStore(tmp_path / "results")
    for lr in (0.003, 0.01, 0.03):
        write(store, cell(lr=lr, val_fraction=0.0), top1=0.5 + lr, val=None)
    data = context(tmp_path / "results")
    assert len(data.leaderboard) == 3 and data.leaderboard["rank"].isna().all()
    assert list(data.leaderboard["tried"]) == [1, 1, 1]
    assert list(data.leaderboard["lr"]) == [0.003, 0.01, 0.03]  # config order, not test order


# ---------------------------------------------------------------- rows from an older bench, no validation split


def test_old_rows_and_rows_without_validation(tmp_path, no_plots):
    """Files lacking the new columns load; configs without validation follow the ranked ones, never by test."""
    root = tmp_path / "results"
    store = ResultStore(root)
    write(store, cell("resnet18"), top1=0.70, val=0.75)
    write(store, cell("vgg16"), top1=0.60, val=0.80)
    write(store, cell("convnext_tiny", val_fraction=0.0), top1=0.99, val=None)  # best test: must not rank first
    write(store, cell("alexnet", val_fraction=0.0), top1=0.10, val=None)
    new = {"test_correct", "test_epoch", "restore_best", "probe_norm", "data_device_bytes", "peak_vram_train_bytes",
           "input_mean", "input_std", "interpolation", "stored_resolution"}
    for path in (root / "sel" / "cells").glob("*.parquet"):  # as an older bench wrote them
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([c for c in table.column_names if c in new]), path)
    outcome = build_report(root, tmp_path / "out")
    markdown = outcome.markdown.read_text()
    rows = md_rows(markdown, "## Leaderboard")
    assert [(r["#"], r["model"]) for r in rows] == [("1", "vgg16"), ("2", "resnet18"), ("–", "alexnet"),
                                                     ("–", "convnext_tiny")]
    assert "2 config(s) without validation accuracy" in markdown
    assert "vs #1 (McNemar)" not in rows[0] and "no pair of configs recorded which test images" in markdown
    assert "test_correct" not in " ".join(outcome.problems)


# ---------------------------------------------------------------- McNemar


def test_mcnemar_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 2) == 1.0  # 5 discordant images: nothing to see
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(100, 0) < 1e-29 and mcnemar_p(0, 100) == mcnemar_p(100, 0)
    assert mcnemar_p(15, 5) == pytest.approx(0.04138946533203125)  # 2 * P(X <= 5), X ~ Binomial(20, 1/2)
    # Above EXACT_MAX the chi-squared approximation with continuity correction is within 1% of the exact value.
    b, c = 600, 520
    assert b + c > EXACT_MAX
    exact = float(Fraction(2 * sum(math.comb(b + c, k) for k in range(c + 1)), 2 ** (b + c)))
    assert mcnemar_p(b, c) == pytest.approx(exact, rel=0.01)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_decode_matches_the_workers_format():
    torch = pytest.importorskip("torch")
    from bench.train.metrics import pack_correct, unpack_correct

    v = np.random.default_rng(0).random(10_001) < 0.7
    text = pack_correct(torch.from_numpy(v))
    assert (decode_correct(text, 10_001) == unpack_correct(text, 10_001)).all()
    assert decode_correct(text, 9_000) is None and decode_correct(None, 10) is None and decode_correct("@@", 8) is None


def test_mcnemar_marks_on_a_constructed_case(tmp_path, no_plots):
    """#1 right on 900 of 1000; 'worse' right on 800 of those (b = 100, c = 0); 'close' differs on 5 images
    (b = 3, c = 2); 'lucky' ranks below on validation but is right on 100 more; 'other set' ran a different
    test subset, 'old' recorded no test_correct: neither gets a mark."""
    store = ResultStore(tmp_path / "results")
    best = right_on(900)
    close = best.copy()
    close[[0, 1, 2]] = False
    close[[900, 901]] = True
    cases = [("resnet18", 0.95, best), ("vgg16", 0.90, right_on(800)), ("convnext_tiny", 0.94, close),
             ("densenet121", 0.89, right_on(1000)), ("alexnet", 0.93, best), ("mobilenet_v2", 0.92, None)]
    for model, val, correct in cases:
        extra = {"test_subset": 500} if model == "alexnet" else {}
        write(store, cell(model, **extra), top1=float(np.mean(correct)) if correct is not None else 0.9, val=val,
              correct=correct)
    board = context(tmp_path / "results").leaderboard.set_index("model")
    assert board.loc["resnet18", "vs_best"] == "best"
    assert (board.loc["vgg16", "discordant_b"], board.loc["vgg16", "discordant_c"]) == (100, 0)
    assert board.loc["vgg16", "vs_best"] == "worse"
    assert (board.loc["convnext_tiny", "discordant_b"], board.loc["convnext_tiny", "discordant_c"]) == (3, 2)
    assert board.loc["convnext_tiny", "vs_best"] == "≈ best" and board.loc["convnext_tiny", "p_holm"] == 1.0
    assert board.loc["densenet121", "vs_best"] == "better"  # test disagrees with validation, visibly
    assert board.loc["alexnet", "vs_best"] == "" and board.loc["mobilenet_v2", "vs_best"] == ""
    # Holm over the three comparisons made: the smallest p is multiplied by 3.
    assert board.loc["vgg16", "p_holm"] == pytest.approx(min(1.0, 3 * mcnemar_p(100, 0)))
    assert board.loc["vgg16", "p_holm"] < ALPHA
    markdown = build_report(tmp_path / "results", tmp_path / "out").markdown.read_text()
    marks = {r["model"]: r["vs #1 (McNemar)"] for r in md_rows(markdown, "## Leaderboard")}
    assert marks == {"resnet18": "best", "convnext_tiny": "≈ best", "alexnet": "–", "mobilenet_v2": "–",
                     "vgg16": "worse", "densenet121": "better"}
    assert "McNemar's test" in markdown and "Holm-corrected" in markdown and "α = 0.05" in markdown


def test_mcnemar_pools_matched_seeds_only(tmp_path):
    store = ResultStore(tmp_path / "results")
    for seed in (0, 1):
        write(store, cell("resnet18", seed=seed), top1=0.9, val=0.95, correct=right_on(900))
    write(store, cell("vgg16", seed=1), top1=0.89, val=0.90, correct=right_on(890))  # seed 0 never ran
    write(store, cell("vgg16", seed=7), top1=0.10, val=0.90, correct=right_on(100))  # no partner
    board = context(tmp_path / "results").leaderboard.set_index("model")
    assert board.loc["vgg16", "paired_seeds"] == 1
    assert (board.loc["vgg16", "discordant_b"], board.loc["vgg16", "discordant_c"]) == (10, 0)


# ---------------------------------------------------------------- regressions beyond the seeds' noise


def _runs(tmp_path: Path, configs: dict[str, tuple[list[float], list[float]]], metric: str = "top1") -> Path:
    """Run r1 then r2 of one config per entry: name -> (values before, values after), one per seed."""
    store = ResultStore(tmp_path / "results")
    for run, when, index in (("r1", T0, 0), ("r2", T0 + dt.timedelta(days=1), 1)):
        for model, values in configs.items():
            for seed, value in enumerate(values[index]):
                metrics = {"top1": value} if metric == "top1" else {"top1": 0.9, "images_per_s": value}
                write(store, cell(model, seed=seed), val=0.9, run=run, when=when, **metrics)
    return tmp_path / "results"


def test_a_drop_inside_the_seeds_spread_is_not_a_regression(tmp_path, no_plots):
    results = _runs(tmp_path, {
        "resnet18": ([0.80, 0.85, 0.90], [0.77, 0.82, 0.87]),  # -3 pts, but seeds spread 5 pts: 2 SE = 8.2 pts
        "vgg16": ([0.800, 0.801, 0.802], [0.770, 0.771, 0.772]),  # -3 pts on a spread of 0.1 pt
        "convnext_tiny": ([0.80], [0.78]),  # one seed: threshold (1 pt) alone
        "alexnet": ([0.80], [0.795]),  # one seed, inside the threshold
    })
    data = context(results)
    flagged = dict(zip(data.comparison["model"], data.comparison["regression"]))
    assert flagged["resnet18"] == "" and flagged["alexnet"] == ""
    assert flagged["vgg16"].startswith("top1 -3.00 pts")
    assert "one seed and no history, so the threshold alone" in flagged["convnext_tiny"]
    allowed = dict(zip(data.comparison["model"], data.comparison["top1_allowed"]))
    assert allowed["resnet18"] == pytest.approx(2 * 0.05 * math.sqrt(2 / 3))
    assert allowed["vgg16"] == pytest.approx(0.01)  # the threshold, larger than 2 SE here
    outcome = build_report(results, tmp_path / "out")
    assert len(outcome.regressions) == 2
    markdown = outcome.markdown.read_text()
    assert "ran one seed on each side" in markdown and "2 standard errors" in markdown


def test_images_per_s_follow_the_same_rule(tmp_path):
    results = _runs(tmp_path, {
        "resnet18": ([1000.0, 1500.0, 500.0], [850.0, 1275.0, 425.0]),  # -15%, spread ±50%
        "vgg16": ([1000.0, 1010.0, 990.0], [850.0, 858.5, 841.5]),  # -15%, spread ±1%
    }, metric="images_per_s")
    data = context(results)
    flagged = dict(zip(data.comparison["model"], data.comparison["regression"]))
    assert flagged["resnet18"] == "" and flagged["vgg16"].startswith("images/s -15.0%")


def test_status_loss_is_always_a_regression(tmp_path):
    store = ResultStore(tmp_path / "results")
    for seed in (0, 1):
        write(store, cell(seed=seed), top1=0.8, val=0.8)
        later = T0 + dt.timedelta(days=1)
        if seed:
            write(store, cell(seed=seed), top1=None, val=None, run="r2", when=later, status="oom")
        else:
            write(store, cell(seed=seed), top1=0.8, val=0.8, run="r2", when=later)
    (reason,) = context(tmp_path / "results").comparison["regression"]
    assert reason == "1 of 2 seeds now oom (was ok)"


def test_compare_runs_empty_inputs():
    import pandas as pd

    assert compare_runs(pd.DataFrame(), pd.DataFrame(), [], top1_drop=0.01, speed_drop=0.1).empty


@pytest.mark.parametrize("drop, code", [(0.03, 0), (0.10, 1)])
def test_fail_on_regression_exits_1_only_when_flagged(tmp_path, monkeypatch, drop, code):
    from bench.cli import main

    monkeypatch.setattr(report_plots, "PLOTS", {})
    results = _runs(tmp_path, {"resnet18": ([0.80, 0.85, 0.90], [0.80 - drop, 0.85 - drop, 0.90 - drop])})
    out = CliRunner().invoke(main, ["report", "--results", str(results), "--out", str(tmp_path / "rep"),
                                    "--fail-on-regression"])
    assert out.exit_code == code, out.output
    assert ("regression: " in out.output) == bool(code)
