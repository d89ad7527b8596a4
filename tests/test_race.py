"""A race: successive halving over a suite's configs. Survivors' rows equal a full grid's; dropped configs get
`dropped` rows that resume and --retry-failed leave alone; a race killed at a rung boundary resumes exactly once."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import race
from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import Cell, RaceSpec, expand, parse_suite

TINY = {"resolution": 32, "batch_size": 16, "train_subset": 64, "test_subset": 32,
        "pretrained": False, "epochs": 3, "val_fraction": 0.25}
COMPARED = ("top1", "test_correct", "val_top1_tested", "epochs_run", "steps_run", "test_epoch")


def suite_of(name: str, race_: dict | None = None):
    raw = {"name": name, "dataset": "synthetic", "defaults": TINY,
           "grid": {"model": ["tv:resnet18", "tv:mobilenet_v3_small"], "freeze": ["none", "all"]}}
    if race_ is not None:
        raw["race"] = race_
    return parse_suite(raw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    suite = suite_of("race")
    root = tmp_path_factory.mktemp("grid")
    run_suite(suite, expand(suite), RunOptions(results=root))
    read = ResultStore(root).read()
    return read.cells.set_index("cell_id"), read.epochs


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    suite = suite_of("race", {"eta": 2, "rungs": [1]})
    root = tmp_path_factory.mktemp("raced")
    events = []
    run_suite(suite, expand(suite), RunOptions(results=root), events.append)
    return root, suite, ResultStore(root).read().cells.set_index("cell_id"), events


def test_the_cut_keeps_the_best_share_and_every_config_tied_with_the_line():
    scores = [race.Score("a", 0.80, None, 1), race.Score("b", 0.70, None, 1), race.Score("c", 0.695, None, 1),
              race.Score("d", 0.50, None, 1)]
    decided = race.cut(scores, eta=2, margin=0.01)
    assert decided.kept == ["a", "b", "c"] and decided.dropped == ["d"] and decided.line == 0.70  # c within 1 pt
    # With seeds their spread decides: a noisy racer 5 pts below the line is not told apart from it ...
    noisy = [race.Score("a", 0.80, 0.01, 3), race.Score("b", 0.70, 0.02, 3), race.Score("c", 0.65, 0.03, 3)]
    assert race.cut(noisy, eta=3, margin=0.01).kept == ["a"]  # 10 and 15 pts below a: beyond their noise
    # 5 pts < 2 x sqrt(2 x 0.0014 / 3) = 6.1 pts, the seeds' variance pooled: (3 x (.01^2 + .02^2 + .03^2)) / 3
    assert race.cut(noisy, eta=2, margin=0.01).kept == ["a", "b", "c"]
    # ... and one seed's worth of evidence never counts as three: identical seeds have zero spread, the margin holds
    assert race.cut([race.Score("a", 0.8, 0.0, 3), race.Score("b", 0.78, 0.0, 3)], eta=2, margin=0.01).dropped == ["b"]


def test_two_seeds_that_happen_to_agree_get_the_rungs_pooled_noise_not_none():
    """Two seeds give a racer one degree of freedom: c's seeds agreeing (and the line's) is luck, not certainty.
    Its own spread would allow it the 1-pt margin and drop it 4 pts below the line; the rung's pooled seed noise
    (b's seeds are 6 pts apart) keeps it, as it keeps b."""
    scores = [race.Score("a", 0.80, 0.0, 2), race.Score("b", 0.76, 0.03, 2), race.Score("c", 0.76, 0.0, 2)]
    decided = race.cut(scores, eta=3, margin=0.01)
    assert decided.kept == ["a", "b", "c"]
    assert decided.band["b"] == decided.band["c"] == pytest.approx(2 * (2 * 0.0006 / 2) ** 0.5)  # pooled var 0.0006
    assert race.pooled_variance([race.Score("a", 0.8, None, 1)]) is None  # one seed measures no noise


def test_rungs_default_to_powers_of_eta_below_the_epochs():
    assert race.rungs_for(RaceSpec(), 10) == [1, 3, 9] and race.rungs_for(RaceSpec(eta=2), 4) == [1, 2]
    assert race.rungs_for(RaceSpec(rungs=[2, 5, 8]), 6) == [2, 5]


def test_lr_sweeps_and_seeds_race_as_one_config():
    a = Cell(model="tv:resnet18", lr=0.1, seed=0)
    assert race.racer_key(a) == race.racer_key(a.model_copy(update={"lr": 0.01, "seed": 3}))
    assert race.racer_key(a) != race.racer_key(a.model_copy(update={"resolution": 64}))


def test_survivors_rows_equal_the_full_grids_and_dropped_ones_carry_the_rung(grid, raced):
    full, full_epochs = grid
    _, suite, rows, events = raced
    assert set(rows["status"]) <= {"ok", "dropped"} and len(rows) == 4
    survivors, dropped = rows[rows["status"] == "ok"], rows[rows["status"] == "dropped"]
    assert len(survivors) >= 2 and len(dropped) >= 1  # eta 2 over 4 configs: at least 2 go on
    for cell_id, row in survivors.iterrows():
        assert row["race_rung"] == 1
        for column in COMPARED:
            assert row[column] == full.loc[cell_id, column], column
    for cell_id, row in dropped.iterrows():
        first = full_epochs[(full_epochs["cell_id"] == cell_id) & (full_epochs["epoch"] == 0)]["val_top1"].item()
        assert row["race_rung"] == 0 and row["epochs_run"] == 1 and math.isclose(row["val_top1_final"], first)
        assert "dropped by the race at rung 1 (1 epochs)" in row["error"]
        # the settings the run resolved, as a finished row records them (not the cell's auto / null)
        assert (row["precision"], row["cudnn_benchmark"], row["cuda_graphs"]) == (
            survivors["precision"].iloc[0], survivors["cudnn_benchmark"].iloc[0], survivors["cuda_graphs"].iloc[0])
        assert row["lr"] == full.loc[cell_id, "lr"]
        # the cut was honest: every dropped config scored below every survivor at the rung
        assert all(first < full_epochs[(full_epochs["cell_id"] == s) & (full_epochs["epoch"] == 0)]["val_top1"].item()
                   for s in survivors.index)
    assert any(e.get("kind") == "race" and "rung 1 of 1" in e["text"] for e in events)


def test_dropped_rows_are_left_alone_by_resume_and_retry_failed(raced):
    root, suite, _, _ = raced
    assert run_suite(suite, expand(suite), RunOptions(results=root)).rows == []
    assert run_suite(suite, expand(suite), RunOptions(results=root, retry_failed=True)).rows == []
    assert not list((root / "race" / "state").glob("*/meta.json"))  # every state went with its row


@pytest.mark.parametrize("where", ["before_the_cut", "after_the_cut"])
def test_a_race_killed_at_the_rung_resumes_exactly_once(tmp_path, monkeypatch, raced, where):
    _, _, expected, _ = raced
    suite = suite_of("race", {"eta": 2, "rungs": [1]})
    real_add = race.RaceLog.add

    def killed(self, decision):
        if where == "after_the_cut":
            real_add(self, decision)
        raise KeyboardInterrupt

    monkeypatch.setattr(race.RaceLog, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, expand(suite), RunOptions(results=tmp_path))
    assert ResultStore(tmp_path).read().cells.empty  # every config paused at the rung, no row yet
    monkeypatch.setattr(race.RaceLog, "add", real_add)
    run_suite(suite, expand(suite), RunOptions(results=tmp_path))
    rows = ResultStore(tmp_path).read().cells
    assert rows["cell_id"].is_unique and len(rows) == 4  # exactly once
    got = rows.set_index("cell_id").sort_index()
    pd.testing.assert_series_equal(got["status"], expected.sort_index()["status"])
    ok = got[got["status"] == "ok"]
    for column in ("top1", "test_correct"):
        assert (ok[column] == expected.loc[ok.index, column]).all()


def test_the_plan_counts_the_configs_alive_at_each_rung_and_their_epochs():
    cells = [Cell(model="tv:resnet18", resolution=r, epochs=9) for r in (32, 40, 48, 56, 64, 72, 80, 88, 96)]
    planned = race.plan(cells, RaceSpec(), [9.0] * 9)  # one second per epoch each
    assert planned.rungs == [1, 3] and planned.alive == [9, 3, 1]
    # all nine for epoch 1, three for epochs 2-3, one for epochs 4-9: 9 + 6 + 6 of the grid's 81 seconds
    assert planned.grid_s == 81.0 and math.isclose(planned.race_s, 21.0)


def test_validate_prints_the_race_plan(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    out = CliRunner().invoke(main, ["validate", "--race", "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "race (eta 3, rungs at 1 epochs, margin 1 pts): configs 4 -> 2; about" in out.output


def test_a_config_dropped_by_a_race_after_a_full_grid_is_no_regression(grid):
    from bench.report.compare import compare_runs
    from bench.report.select import normalise

    full, _ = grid
    before = normalise(full.reset_index().assign(run_id="grid"))
    after = before.assign(run_id="race", status="dropped", top1=None)
    compared = compare_runs(after, before, [], top1_drop=0.01, speed_drop=0.10)
    assert len(compared) == 4 and (compared["regression"] == "").all()
    assert (compare_runs(before.assign(run_id="race", status="error", top1=None), before, [], top1_drop=0.01,
                         speed_drop=0.10)["regression"] != "").all()  # a failure still is one
