"""The report of a race: the Race section (each config's validation top-1 at each rung, where it was dropped, the
device-hours against the full grid's estimate, the curves), the dropped configs under the leaderboard, and the
"Which should I pick?" line. Rows are written through `ResultStore.write` as the runner writes a race's (a dropped
row: status dropped, race_rung, epochs_run and validation top-1 at its rung), so no test trains anything."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bench.report import build_report
from bench.report import plots as report_plots
from bench.report import race
from bench.report.context import make_context
from bench.report.select import select_rows
from bench.store import ResultStore
from bench.suite import Cell

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
EPOCHS, RUNGS = 9, (1, 3)  # two rungs: after 1 and after 3 epochs; eta 2
# config -> (validation top-1 after the first epoch, gain per epoch). At rung 1 convnext/none, efficientnet/none and
# resnet18/none go on and the three probes are dropped; at rung 2 resnet18/none is; efficientnet_b0/none learns
# faster than convnext and finishes first.
CONFIGS = {("resnet18", "none"): (0.70, 0.02), ("resnet18", "all"): (0.60, 0.01),
           ("efficientnet_b0", "none"): (0.75, 0.02), ("efficientnet_b0", "all"): (0.50, 0.01),
           ("convnext_tiny", "none"): (0.80, 0.01), ("convnext_tiny", "all"): (0.55, 0.01)}
DROPPED_AT = {("resnet18", "all"): 0, ("efficientnet_b0", "all"): 0, ("convnext_tiny", "all"): 0,
              ("resnet18", "none"): 1}
EPOCH_S = {"resnet18": 10.0, "efficientnet_b0": 20.0, "convnext_tiny": 40.0}  # fine-tuning; a probe takes half
EVAL_S, TEST_S = 1.0, 4.0  # validation per epoch; the test pass a finished cell runs once


def val(model: str, freeze: str, seed: int, epoch: int) -> float:
    """Validation top-1 after epoch `epoch` (0-based); seeds spread by 1 pt."""
    first, gain = CONFIGS[(model, freeze)]
    return first + gain * epoch + 0.01 * seed


def epoch_s(model: str, freeze: str) -> float:
    return EPOCH_S[model] / (2 if freeze == "all" else 1)


def write_cell(store: ResultStore, model: str, freeze: str, seed: int, *, raced: bool = True,
               dropped_at: dict | None = None, **fields) -> None:
    """One raced cell's row and epoch table, as the runner writes it: dropped at its rung, or finished."""
    cell = Cell(suite="race", dataset="cifar10", model=model, freeze=freeze, seed=seed, epochs=EPOCHS, **fields)
    rung = (DROPPED_AT if dropped_at is None else dropped_at).get((model, freeze))
    ran = EPOCHS if rung is None else RUNGS[rung]
    curve = [val(model, freeze, seed, e) for e in range(ran)]
    row = {**cell.model_dump(), "freeze": freeze, "run_id": "r1", "cell_id": cell.id, "group_id": cell.group_id,
           "cell_json": cell.canonical(), "epochs_run": ran, "train_s": ran * epoch_s(model, freeze),
           "eval_s": ran * EVAL_S, "val_top1_final": curve[-1], "val_top1_best": max(curve), "device": "cuda",
           "gpu_name": "NVIDIA H100 80GB HBM3", "started_at": T0, "finished_at": T0, "test_images": 1000}
    if rung is None:
        # It paused at each rung and resumed, so its last segment began at the last rung.
        segments = {"segments": len(RUNGS) + 1, "resumed_from_epoch": RUNGS[-1]} if raced else {}
        row |= {"status": "ok", "race_rung": len(RUNGS) if raced else None, "eval_s": ran * EVAL_S + TEST_S, **segments,
                "top1": curve[-1] - 0.02, "val_top1_tested": max(curve), "images_per_s": 1000.0}
    else:
        row |= {"status": "dropped", "race_rung": rung, "val_top1_tested": curve[-1],
                "error": f"dropped by the race at rung {rung + 1} ({ran} epochs): validation top-1 "
                         f"{100 * curve[-1]:.2f}%, below the cut-line"}
    epochs = [{"epoch": e, "step": 10 * (e + 1), "val_top1": v, "epoch_s": epoch_s(model, freeze)}
              for e, v in enumerate(curve)]
    store.write(row, epochs)


@pytest.fixture
def raced(tmp_path) -> Path:
    store = ResultStore(tmp_path / "results")
    for (model, freeze), seed in itertools.product(CONFIGS, (0, 1)):
        write_cell(store, model, freeze, seed)
    return tmp_path / "results"


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTS", {})  # the common plots are drawn by tests/test_report.py
    monkeypatch.setattr(report_plots, "OPTIONAL_PLOTS", {})


def context(root: Path):
    read = ResultStore(root).read()
    return make_context(select_rows(read.cells, read.epochs, str(root)), top1_drop=0.01, speed_drop=0.10)


def md_rows(markdown: str, heading: str) -> list[dict[str, str]]:
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in table]
    return [dict(zip(split[0], row)) for row in split[2:]]


def section(markdown: str, title: str) -> str:
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ---------------------------------------------------------------- the numbers


def expected_hours() -> tuple[float, float]:
    """(spent, full grid) seconds, from the rows' definition: every raced cell's train_s + eval_s; a dropped cell's
    full run its time per epoch (training and validation) times EPOCHS."""
    spent = full = 0.0
    for (model, freeze), _ in itertools.product(CONFIGS, (0, 1)):
        rung = DROPPED_AT.get((model, freeze))
        per_epoch = epoch_s(model, freeze) + EVAL_S
        if rung is None:
            spent += EPOCHS * per_epoch + TEST_S
            full += EPOCHS * per_epoch + TEST_S
        else:
            spent += RUNGS[rung] * per_epoch
            full += EPOCHS * per_epoch
    return spent, full


def test_the_race_numbers_follow_the_rows(raced):
    (r,) = race.races(context(raced))
    assert r.suite == "race" and r.rungs == list(RUNGS) and r.epochs == EPOCHS and r.device == "GPU"
    spent, full = expected_hours()
    assert (r.spent_s, r.full_s) == (pytest.approx(spent), pytest.approx(full)) and r.unestimated == 0
    assert (spent, full) == (1274.0, 2014.0)  # hand-checked: the dropped cells would have cost 740 s more
    table = r.racers
    assert list(zip(table["model"], table["outcome"])) == [
        ("efficientnet_b0", "finished"), ("convnext_tiny", "finished"), ("resnet18", "dropped"),
        ("resnet18", "dropped"), ("convnext_tiny", "dropped"), ("efficientnet_b0", "dropped")]
    assert list(table["rank"][:2]) == [1, 2] and table["rank"][2:].isna().all()
    assert [None if pd.isna(k) else int(k) for k in table["rung"]] == [None, None, 1, 0, 0, 0]
    # A score is the mean over the two seeds after the rung's epochs; a dropped config has none after its rung.
    assert table["scores"][0] == [pytest.approx(0.755), pytest.approx(0.795)]
    assert table["scores"][2] == [pytest.approx(0.705), pytest.approx(0.745)]
    assert table["scores"][3] == [pytest.approx(0.605), None]
    assert table["final"][0] == pytest.approx(0.75 + 0.02 * 8 + 0.005)  # the leaderboard's validation mean
    assert table["spent_s"][2] == pytest.approx(2 * 3 * (10 + EVAL_S))  # resnet18/none, two seeds, 3 epochs
    assert table["full_s"][2] == pytest.approx(2 * EPOCHS * (10 + EVAL_S))


def test_a_rung_that_dropped_nobody_says_its_epochs_were_not_recorded(raced):
    rows = context(raced).current
    assert race.rung_epochs(rows.assign(segments=None)) == [1, 3]  # both rungs dropped someone
    no_second = rows[~((rows["status"] == "dropped") & (rows["race_rung"] == 1))]
    assert race.rung_epochs(no_second) == [1, 3]  # the finished rows resumed from the last rung
    # A finished cell that was also killed and resumed ran in more segments: where it resumed says nothing.
    assert race.rung_epochs(no_second.assign(segments=4)) == [1, None]
    assert race.rung_name(1, None) == "rung 2 (epochs not recorded)"


def test_a_race_that_dropped_nobody(tmp_path, no_plots):
    store = ResultStore(tmp_path / "results")
    for (model, freeze), seed in itertools.product(CONFIGS, (0, 1)):
        write_cell(store, model, freeze, seed, dropped_at={})
    (r,) = race.races(context(tmp_path / "results"))
    assert r.rungs == [None, 3] and r.spent_s == r.full_s and r.count("finished") == 6
    markdown = build_report(tmp_path / "results", tmp_path / "out").markdown.read_text()
    race_md = section(markdown, "Race")
    assert "2 rung(s): 6 finished all 9 epochs; none was dropped." in race_md
    assert "Rung 1 dropped no config, and no row records how many epochs it was" in race_md
    assert [row["val % at rung 1 (epochs not recorded)"] for row in md_rows(race_md, "### Validation")] == ["–"] * 6
    assert md_rows(race_md, "### Validation")[0]["val % at rung 2 (3 epochs)"] == "79.50"  # #1 efficientnet_b0/none
    pick = section(markdown, "Which should I pick?")
    assert "every config stayed within noise of the cut-line or above it, so the pick is the one the full grid" in pick
    assert "Dropped by the race" not in markdown and race.RISK not in markdown.replace("\\", "")


def test_a_dropped_cell_without_times_counts_at_what_it_spent(tmp_path):
    store = ResultStore(tmp_path / "results")
    for (model, freeze), seed in itertools.product(CONFIGS, (0, 1)):
        write_cell(store, model, freeze, seed)
    cell = Cell(suite="race", dataset="cifar10", model="resnet18", freeze="all", seed=2, epochs=EPOCHS)
    store.write({**cell.model_dump(), "freeze": "all", "run_id": "r1", "cell_id": cell.id, "group_id": cell.group_id,
                 "status": "dropped", "race_rung": 0, "epochs_run": None, "train_s": None, "eval_s": None,
                 "started_at": T0, "finished_at": T0}, [])
    (r,) = race.races(context(tmp_path / "results"))
    spent, full = expected_hours()
    assert r.unestimated == 1 and (r.spent_s, r.full_s) == (pytest.approx(spent), pytest.approx(full))
    assert "1 dropped cell(s) recorded no times to estimate from" in race.cost(r)


# ---------------------------------------------------------------- the report


def test_the_race_section_the_dropped_list_and_the_pick(raced, no_plots, tmp_path):
    outcome = build_report(raced, tmp_path / "out")
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    assert markdown.index("## Leaderboard") < markdown.index("## Race") < markdown.index("## Per class")
    assert '<section id="race">' in page and '<a href="#race">Race</a>' in page

    # The leaderboard ranks the two finished configs only; the dropped ones are listed under it with their rung.
    board = md_rows(markdown, "## Leaderboard")
    assert [(b["#"], b["model"], b["freeze"]) for b in board] == [("1", "efficientnet_b0", "none"),
                                                                   ("2", "convnext_tiny", "none")]
    dropped = md_rows(markdown, "### Dropped by the race (not ranked)")
    assert [(d["config"].split()[0], d["dropped at"], d["val top-1 % at the rung"], d["cells"]) for d in dropped] == [
        ("resnet18", "rung 2 (3 epochs)", "74.50", "2"), ("resnet18", "rung 1 (1 epoch)", "60.50", "2"),
        ("convnext_tiny", "rung 1 (1 epoch)", "55.50", "2"), ("efficientnet_b0", "rung 1 (1 epoch)", "50.50", "2")]
    assert markdown.index("### Dropped by the race") < markdown.index("### Pareto front")
    assert "None: every shown cell finished with status ok or was dropped by the race" in section(markdown, "Failed cells")

    race_md = section(markdown, "Race")
    assert ("Suite race raced 6 configs (12 cells) on validation top-1 at 2 rung(s): 2 finished all 9 epochs; 4 were "
            "dropped: 3 at rung 1 (1 epoch), 1 at rung 2 (3 epochs).") in race_md
    rungs = md_rows(race_md, "### Validation top-1 at each rung")
    first = rungs[0]
    assert (first["val % at rung 1 (1 epoch)"], first["val % at rung 2 (3 epochs)"],
            first["val % final (9 epochs, selects)"], first["outcome"]) == ("75.50", "79.50", "91.50", "finished, #1")
    assert [r["outcome"] for r in rungs] == ["finished, #1", "finished, #2", "dropped at rung 2"] + ["dropped at rung 1"] * 3
    assert rungs[3]["val % at rung 2 (3 epochs)"] == "–" and rungs[3]["val % final (9 epochs, selects)"] == "–"
    assert rungs[2]["device-hours spent"] == "0.0183 GPU-h" and rungs[2]["full grid (est.)"] == "0.055 GPU-h"
    assert ("the race spent 0.354 GPU-h (training and validation of every raced cell); the full grid would have "
            "taken about 0.559 GPU-h, so the race saved about 0.206 GPU-h (37%). The full grid's figure is an "
            "estimate") in race_md
    assert race.RISK in race_md

    pick = section(markdown, "Which should I pick?")
    assert ("This answer comes from a race (suite race: 2 of 6 configs finished, 4 dropped at a rung; it spent "
            "0.354 GPU-h of the full grid's estimated 0.559 GPU-h, saving about 0.206 GPU-h, 37%)") in pick
    assert "**Pick efficientnet_b0 at 32 px" in pick and race.RISK in pick


def test_without_a_race_nothing_changes(tmp_path, no_plots):
    """The same finished rows, not raced: no Race section, no dropped list, no race line."""
    store = ResultStore(tmp_path / "results")
    for (model, freeze), seed in itertools.product([("efficientnet_b0", "none"), ("convnext_tiny", "none")], (0, 1)):
        write_cell(store, model, freeze, seed, raced=False)
    outcome = build_report(tmp_path / "results", tmp_path / "out")
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    assert "## Race" not in markdown and 'id="race"' not in page and "Dropped by the race" not in markdown
    assert "race" not in section(markdown, "Which should I pick?").replace("suite race", "")
    assert "None: every shown cell finished with status ok." in markdown
    assert race.races(context(tmp_path / "results")) == []


def test_a_tuned_sweep_races_as_one_config_scored_by_its_best_value(tmp_path):
    """Two lr values of resnet18/none are one racer: its score at a rung is the better value's mean over seeds."""
    store = ResultStore(tmp_path / "results")
    for (model, freeze), seed in itertools.product(CONFIGS, (0, 1)):
        write_cell(store, model, freeze, seed, lr=0.1)
    for seed in (0, 1):  # a worse learning rate of the same config, dropped with it: 5 pts lower everywhere
        cell = Cell(suite="race", dataset="cifar10", model="resnet18", freeze="none", seed=seed, epochs=EPOCHS, lr=0.01)
        curve = [val("resnet18", "none", seed, e) - 0.05 for e in range(3)]
        store.write({**cell.model_dump(), "freeze": "none", "run_id": "r1", "cell_id": cell.id,
                     "group_id": cell.group_id, "status": "dropped", "race_rung": 1, "epochs_run": 3, "train_s": 30.0,
                     "eval_s": 3.0, "val_top1_final": curve[-1], "val_top1_tested": curve[-1], "started_at": T0,
                     "finished_at": T0}, [{"epoch": e, "val_top1": v, "epoch_s": 10.0} for e, v in enumerate(curve)])
    (r,) = race.races(context(tmp_path / "results"))
    assert len(r.racers) == 6
    (swept,) = [row for _, row in r.racers.iterrows() if row["model"] == "resnet18" and row["cells"] == 4]
    assert swept["scores"] == [pytest.approx(0.705), pytest.approx(0.745)] and len(swept["groups"]) == 2


# ---------------------------------------------------------------- the plot, and the page in a browser


def test_the_race_plot_is_drawn_with_every_config(raced):
    data = context(raced)
    fig = report_plots.race_curves(data)
    (ax,) = fig.axes
    drawn = [line for line in ax.get_lines() if line.get_transform() is ax.transData and len(line.get_xdata())]
    curves = [line for line in drawn if line.get_linestyle() != "None"]
    crosses = [line for line in drawn if line.get_marker() == "X"]
    assert len(curves) == 6 and sum((line.get_alpha() or 1) < 1 for line in curves) == 4  # every config; dropped faded
    assert [line.get_linestyle() for line in curves if (line.get_alpha() or 1) == 1] == ["-", "-"]  # finished: solid
    assert sorted(max(line.get_xdata()) for line in curves) == [1, 1, 1, 3, 9, 9]  # each ends where it stopped
    assert sorted(float(line.get_xdata()[-1]) for line in crosses) == [1, 1, 1, 3]  # a cross where each was cut
    assert all(line.get_markevery() == [len(line.get_xdata()) - 1] for line in crosses)  # there, and only there
    rungs = [line for line in ax.get_lines() if line.get_transform() is not ax.transData]
    assert sorted(float(line.get_xdata()[0]) for line in rungs) == [1, 3]
    assert [t.get_text().strip() for t in ax.texts] == ["rung 1", "rung 2"]
    labels = [" ".join(t.get_text().split()) for t in ax.get_legend().get_texts()]  # in the race table's order
    assert max(len(line) for t in ax.get_legend().get_texts() for line in t.get_text().splitlines()) <= 48  # wrapped
    assert labels[0].startswith("#1 efficientnet_b0") and labels[1].startswith("#2 convnext_tiny")
    assert labels[2:] == [f"{name} r32 bs128 freeze={freeze} (dropped at rung {rung})" for name, freeze, rung in
                          [("resnet18", "none", 2), ("resnet18", "all", 1), ("convnext_tiny", "all", 1),
                           ("efficientnet_b0", "all", 1)]]


def test_the_race_renders_in_headless_chromium(raced, tmp_path, monkeypatch):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the HTML was not rendered in a browser")
    monkeypatch.setattr(report_plots, "PLOTS", {})  # the race's plot alone
    outcome = build_report(raced, tmp_path / "out")
    assert [p.name for p in outcome.pngs] == ["race_curves.png"] and "](race_curves.png)" in outcome.markdown.read_text()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    url = outcome.html.resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=90).stdout
    race_html = dom.split('<section id="race">')[1].split("</section>")[0]
    assert race_html.count("<table") == 1 and race_html.count('class="unranked"') == 4
    assert re.search(r'<figure id="plot-race_curves">.*<img [^>]*src="data:image/png;base64,[^"]{1000,}"', race_html, re.S)


def test_many_dropped_configs_share_one_legend_entry(raced, monkeypatch):
    monkeypatch.setattr(report_plots, "MAX_NAMED", 3)  # 4 dropped: more than the legend names one by one
    ax = report_plots.race_curves(context(raced)).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 3 and labels[2] == "dropped (faded; × where cut)" and labels[0].startswith("#1 ")


def test_a_later_report_without_a_race_removes_the_race_plot(raced, tmp_path, monkeypatch):
    monkeypatch.setattr(report_plots, "PLOTS", {})
    out = tmp_path / "out"
    assert [p.name for p in build_report(raced, out).pngs] == ["race_curves.png"]
    plain = ResultStore(tmp_path / "plain")
    for seed in (0, 1):
        write_cell(plain, "efficientnet_b0", "none", seed, raced=False)
    assert build_report(tmp_path / "plain", out).pngs == [] and not (out / "race_curves.png").exists()
