"""The report's statistics (issue 22): the paired test's unit is the test image, never the (image, seed) pair;
the continuity correction never goes negative; Student's t tail and Holm's correction against known values; a
one-run comparison across GPUs or library versions judges accuracy only, and says so; one seed and no history is
the threshold alone, and says so."""

from __future__ import annotations

import base64
import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from bench.report import build_report
from bench.report import plots as report_plots
from bench.report.stats import EXACT_MAX, holm, mcnemar_p, t_isf, t_sf, versus_best
from bench.store import ResultStore
from bench.suite import Cell

N_TEST = 1000
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def pack(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def pair(b: int, c: int, right: int = 700) -> tuple[np.ndarray, np.ndarray]:
    """#1 and another on N_TEST images: both right on `right`, b images only #1 got right, c only the other."""
    best, other = np.zeros(N_TEST, bool), np.zeros(N_TEST, bool)
    best[:right] = other[:right] = True
    best[right:right + b] = True
    other[right + b:right + b + c] = True
    return best, other


def marked(vectors: dict[str, dict[int, np.ndarray]]) -> pd.DataFrame:
    """versus_best on a two-row leaderboard ('best' ranked #1, 'other' #2), each with its seeds' vectors."""
    board = pd.DataFrame({"suite": "s", "group_id": ["best", "other"], "rank": pd.array([1, 2], dtype="Int64")})
    trained = pd.DataFrame([{"suite": "s", "group_id": g, "seed": seed, "test_correct": pack(v), "test_images": N_TEST,
                             "dataset": "cifar10", "test_subset": None}
                            for g, seeds in vectors.items() for seed, v in seeds.items()])
    return versus_best(board, trained).set_index("group_id")


def test_three_agreeing_seeds_give_the_evidence_of_one():
    """The issue's case: b = 60, c = 40 is 'not significantly different' on one seed (p ~ 0.06); three seeds that
    agree image for image are the same images, not three times as many (pooled, p was ~6e-4: 'worse')."""
    best, other = pair(60, 40)
    one = marked({"best": {0: best}, "other": {0: other}})
    three = marked({"best": {s: best for s in range(3)}, "other": {s: other for s in range(3)}})
    assert one.loc["other", "p_value"] == pytest.approx(mcnemar_p(60, 40)) and 0.05 < mcnemar_p(60, 40) < 0.07
    assert three.loc["other", "p_value"] == one.loc["other", "p_value"]
    assert (three.loc["other", "discordant_b"], three.loc["other", "discordant_c"]) == (60, 40)  # images, not pairs
    assert three.loc["other", "paired_seeds"] == 3
    assert three.loc["other", "vs_best"] == one.loc["other", "vs_best"] == "≈ best"


def test_per_image_differences_average_over_seeds():
    """Image 700: #1 right and the other wrong on seed 0, the reverse on seed 1 (d = 0, no evidence); image 701:
    #1 right on both seeds, the other on one (d = 1/2 > 0, counts once for b)."""
    b0, o0 = np.zeros(N_TEST, bool), np.zeros(N_TEST, bool)
    b1, o1 = b0.copy(), o0.copy()
    b0[700], o1[700] = True, True
    b0[701] = b1[701] = o0[701] = True
    board = marked({"best": {0: b0, 1: b1}, "other": {0: o0, 1: o1, 5: o1}})  # seed 5 has no partner
    assert (board.loc["other", "discordant_b"], board.loc["other", "discordant_c"]) == (1, 0)
    assert board.loc["other", "paired_seeds"] == 2


def test_continuity_correction_never_goes_negative():
    # |b - c| = 0 above EXACT_MAX: (|b - c| - 1)^2 would be 1 (p ~ 0.98); the corrected statistic is 0 (p = 1).
    assert 1200 > EXACT_MAX
    assert mcnemar_p(600, 600) == 1.0 and mcnemar_p(600, 601) == 1.0
    assert mcnemar_p(620, 580) == pytest.approx(math.erfc(math.sqrt(39**2 / 1200 / 2)))


def test_student_t_tail_and_its_inverse_match_tables():
    # Tables: t(4) 2.132 at 0.05, t(28) 2.048 at 0.025, t(1) tan(pi (1/2 - p)); far tail of t(4): 2.81e-4 at 10.
    assert t_sf(2.1318, 4) == pytest.approx(0.05, abs=1e-5)
    assert t_sf(2.0484, 28) == pytest.approx(0.025, abs=1e-5)
    assert t_sf(3.0, 1) == pytest.approx(0.5 - math.atan(3.0) / math.pi, rel=1e-10)
    assert t_sf(10.0, 4) == pytest.approx(2.8100e-4, rel=1e-3)
    assert t_sf(-1.5, 7) == pytest.approx(1 - t_sf(1.5, 7), rel=1e-12) and t_sf(0.0, 3) == 0.5
    assert t_sf(4.0, 1e6) == pytest.approx(0.5 * math.erfc(4 / math.sqrt(2)), rel=1e-4)  # a normal's tail
    assert t_sf(np.inf, 4) == 0.0 and t_sf(60.0, 9) > 0  # a far tail stays positive: Holm multiplies it
    p = np.array([0.05, 2.5e-4, 1e-6])
    assert t_sf(t_isf(p, [4, 28, 9]), [4, 28, 9]) == pytest.approx(p, rel=1e-8)


def test_holm_per_family_and_per_row():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rows = holm(np.array([[0.01, 0.04, 0.03], [0.5, 0.001, 0.02]]))
    assert rows == pytest.approx(np.array([[0.03, 0.06, 0.06], [0.5, 0.003, 0.04]]))


# ---------------------------------------------------------------- one run: accuracy across machines, speed not


def write(store: ResultStore, model: str, *, run: str, day: int, top1: float, ips: float, seed: int = 0,
          **provenance) -> None:
    cell = Cell(suite="s", dataset="cifar10", model=model, seed=seed)
    when = T0 + dt.timedelta(days=day)
    store.write({**cell.model_dump(), "freeze": str(cell.freeze), "run_id": run, "cell_id": cell.id,
                 "group_id": cell.group_id, "status": "ok", "top1": top1, "val_top1_best": 0.9, "test_images": N_TEST,
                 "train_s": 10.0, "images_per_s": ips, "started_at": when, "finished_at": when,
                 "gpu_name": "NVIDIA H100", "torch_version": "2.4.0", **provenance}, [])


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTS", {})


def test_another_torch_compares_accuracy_only_and_says_so(tmp_path, no_plots):
    """Tonight resnet18 ran on a new torch at half the speed: not a speed regression (the library changed, not
    bench), but its accuracy drop is; vgg16 on the same versions is judged on speed as before."""
    store = ResultStore(tmp_path / "results")
    for model in ("resnet18", "vgg16"):
        write(store, model, run="r1", day=0, top1=0.90, ips=1000.0)
    write(store, "resnet18", run="r2", day=1, top1=0.85, ips=500.0, torch_version="2.5.0")
    write(store, "vgg16", run="r2", day=1, top1=0.90, ips=500.0)
    outcome = build_report(tmp_path / "results", tmp_path / "out", run="r2")
    lines = {line.split(" (config")[0]: line for line in outcome.regressions}
    resnet, vgg = (next(v for k, v in lines.items() if m in k) for m in ("resnet18", "vgg16"))
    assert "top1 -5.00 pts" in resnet and "images/s" not in resnet
    assert "images/s -50.0%" in vgg
    note = next(p for p in outcome.problems if "accuracy only" in p)
    assert "1 config ran on another GPU or library version" in note and "torch_version 2.4.0 → 2.5.0" in note
    assert note in outcome.markdown.read_text()


def test_one_seed_and_no_history_is_the_threshold_alone_and_says_so(tmp_path, no_plots):
    store = ResultStore(tmp_path / "results")
    write(store, "resnet18", run="r1", day=0, top1=0.90, ips=1000.0)
    write(store, "resnet18", run="r2", day=1, top1=0.885, ips=1000.0)
    outcome = build_report(tmp_path / "results", tmp_path / "out", run="r2")
    (line,) = outcome.regressions
    assert "allowed drop 1.00 pts: one seed and no history, so the threshold alone" in line
    (rule,) = outcome.comparison
    assert rule.startswith("s: 1 config compared: 1 against run r1 (1 earlier run; a history needs 5)")
    assert "1 of them ran one seed on each side and has no history, so the threshold alone judged it" in rule
    assert "How the configs were judged: " + rule in outcome.markdown.read_text()


def test_the_comparison_says_which_rule_judged_its_rows(tmp_path, no_plots):
    """resnet18 has six earlier runs (its history judges it); vgg16 joined the suite the night before (the
    previous run judges it): the title and the notes name both rules, and the table which one judged each row."""
    store = ResultStore(tmp_path / "results")
    for day in range(6):
        write(store, "resnet18", run=f"r{day}", day=day, top1=0.90 + 0.001 * (day % 2), ips=1000.0)
    write(store, "vgg16", run="r5", day=5, top1=0.85, ips=1000.0)
    for model in ("resnet18", "vgg16"):
        write(store, model, run="r6", day=6, top1=0.90 if model == "resnet18" else 0.85, ips=1000.0)
    markdown = build_report(tmp_path / "results", tmp_path / "out", run="r6").markdown.read_text()
    section = markdown[markdown.index("## Comparison"):].split("\n## ")[0]
    assert section.startswith("## Comparison with each config's history (6 earlier runs) or the previous run\n")
    assert "1 config(s) judged against their own history" in section and "one-sided t-test" in section
    assert "1 config(s) compared with s: run r5, config by config" in section
    rows = {line.split(" | ")[0].strip("| ").split()[0]: line.split(" | ")[2] for line in section.splitlines()
            if line.startswith(("| resnet18", "| vgg16"))}
    assert rows == {"resnet18": "history: 6 runs (r0 … r5)", "vgg16": "run r5"}
    # Every config with its history: the title says so, and nothing of the one-run rule is left.
    store = ResultStore(tmp_path / "deep")
    for day in range(7):
        write(store, "resnet18", run=f"r{day}", day=day, top1=0.90 + 0.001 * (day % 2), ips=1000.0)
    markdown = build_report(tmp_path / "deep", tmp_path / "out-deep", run="r6").markdown.read_text()
    section = markdown[markdown.index("## Comparison"):].split("\n## ")[0]
    assert section.startswith("## Comparison with each config's history (6 earlier runs)\n")
    assert "compared with" not in section and "threshold alone" not in section
