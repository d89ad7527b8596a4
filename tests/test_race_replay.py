"""`bench race replay`: the race simulated on a finished grid's epoch rows, with synthetic numbers whose answer is
known: one config leads from the first epoch, another learns slowly and overtakes at the end."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from bench import replay
from bench.cli import main
from bench.errors import ResultsError
from bench.result import Accuracy, Build, CellResult, Identity, Process, Training
from bench.store import ResultStore
from bench.suite import Cell, RaceSpec

SUITE = "grid"
EPOCHS = 5
EPOCH_S = [360.0 + 36.0 * e for e in range(EPOCHS)]  # every epoch its own time: 360, 396, 432, 468, 504 s
EVAL_S = 180.0  # 36 s per epoch
# Validation top-1 after each epoch, per config (seeds 0 and 1 lie 0.1 pt above and below). `A` and `A_lr` are one
# racer (an lr sweep); `late` learns slowly and its last epoch is set per test.
CURVES = {
    "A": ({"model": "tv:resnet18", "lr": 0.1}, [0.50, 0.60, 0.70, 0.72, 0.74]),
    "A_lr": ({"model": "tv:resnet18", "lr": 0.01}, [0.40, 0.50, 0.60, 0.65, 0.68]),
    "B": ({"model": "tv:resnet18", "freeze": "all"}, [0.45, 0.55, 0.62, 0.65, 0.66]),
    "C": ({"model": "tv:mobilenet_v3_small"}, [0.30, 0.40, 0.50, 0.55, 0.58]),
    "D": ({"model": "tv:mobilenet_v3_small", "freeze": "all"}, [0.20, 0.30, 0.40, 0.45, 0.50]),
    "E": ({"model": "tv:shufflenet_v2_x0_5"}, [0.10, 0.20, 0.30, 0.40, 0.45]),
    "late": ({"model": "tv:shufflenet_v2_x0_5", "freeze": "all"}, [0.15, 0.30, 0.50, 0.70]),
}
T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)


def cell_of(name: str, seed: int) -> Cell:
    return Cell(suite=SUITE, dataset="synthetic", epochs=EPOCHS, seed=seed, **CURVES[name][0])


def write_cell(store: ResultStore, run_id: str, cell: Cell, vals: list[float], *, status: str = "ok",
               when: datetime = T0, with_epochs: bool = True, images: tuple[int, int] | None = None) -> None:
    identity = Identity(run_id=run_id, suite=SUITE, cell_id=cell.id, group_id=cell.group_id, status=status,
                        cell_json=cell.canonical())
    parts = {"training": Training(epochs_run=len(vals), train_s=sum(EPOCH_S[:len(vals)]), eval_s=EVAL_S),
             "accuracy": Accuracy(val_top1_best=max(vals), val_top1_final=vals[-1], val_top1_tested=max(vals)),
             "process": Process(finished_at=when)}
    if images:  # (validation, test) images: the evaluation time splits by them
        parts["build"] = Build(val_images=images[0], test_images=images[1])
    epochs = [{"epoch": e, "val_top1": v, "epoch_s": EPOCH_S[e]} for e, v in enumerate(vals)]
    store.write(CellResult(identity, cell, parts).row(), epochs if with_epochs else [])


def write_grid(root, last: float, run_id: str = "grid-run", names=tuple(CURVES), **kw) -> ResultStore:
    store = ResultStore(root)
    for name in names:
        vals = CURVES[name][1] + ([last] if name == "late" else [])
        for seed, offset in ((0, 0.001), (1, -0.001)):
            write_cell(store, run_id, cell_of(name, seed), [v + offset for v in vals], **kw)
    return store


def replayed(root, spec: RaceSpec = RaceSpec()) -> replay.Replay:
    read = ResultStore(root).read()
    suite, run_id = replay.choose_run(read.cells, str(root))
    mine = ResultStore(root).read(suites=[suite], runs=[run_id])
    return replay.replay(mine.cells, mine.epochs, spec)


def gid(name: str) -> str:
    return cell_of(name, 0).group_id


# Race: rung 1 (1 epoch) keeps the best 2 of 6 racers (A, B: 'late' is at 15%); rung 2 (3 epochs) keeps A alone.
# Device-hours: 'late', C, D, E trained 1 epoch (2 seeds each), B 3 epochs, A and A_lr all 5, at 36 s eval each.
ONE, THREE, FIVE = 360 + 36, sum(EPOCH_S[:3]) + 3 * 36, sum(EPOCH_S) + 5 * 36
RACE_H, GRID_H = (8 * ONE + 2 * THREE + 4 * FIVE) / 3600, 14 * FIVE / 3600


@pytest.mark.parametrize("last, verdict", [
    (0.80, "worse by 6.00 pts"),  # 'late' overtakes by 6 pts, beyond the 1 pt margin: the race missed it
    (0.745, "within noise"),  # 0.5 pt ahead: inside the band a cut would allow
    (0.70, "same"),  # A stays best
])
def test_the_replay_races_the_epoch_rows_and_says_what_it_would_have_cost(tmp_path, last, verdict):
    done = replayed(write_grid(tmp_path, last).root)
    grid_pick = "late" if last > 0.74 else "A"
    share = 100 * RACE_H / GRID_H
    assert done.summary() == (f"race replay: pick {gid('A')} (grid pick {gid(grid_pick)}; {verdict}), "
                              f"device-hours {RACE_H:.3f} of {GRID_H:.3f} ({share:.1f}%)")
    assert f"{RACE_H:.3f} of {GRID_H:.3f} ({share:.1f}%)" == "4.200 of 9.100 (46.2%)"
    assert [(r.epochs, r.configs_in, r.kept) for r in done.rungs] == [(1, 6, 2), (3, 2, 1)]  # A's lr sweep: one racer


def test_each_resumed_segment_pays_the_first_epochs_warm_up_again(tmp_path, monkeypatch):
    # The first epoch 100 s slower: 10 s over the later epochs' median (396, 432, 468, 504 -> 450) is the warm-up.
    monkeypatch.setattr(sys.modules[__name__], "EPOCH_S", [EPOCH_S[0] + 100.0, *EPOCH_S[1:]])
    done = replayed(write_grid(tmp_path, 0.70).root)
    # A's four cells resume twice (after epochs 1 and 3), B's two once, the dropped never: 10 resumes of 10 s.
    assert done.race_hours == pytest.approx(RACE_H + (14 * 100 + 10 * 10) / 3600)
    assert done.grid_hours == pytest.approx(GRID_H + 14 * 100 / 3600)


def test_a_dropped_cell_is_not_charged_the_test_pass_it_never_ran(tmp_path):
    # 100 validation images a pass, 5 passes, 120 test images: 620 images in EVAL_S (180 s), 100 of them a pass.
    done = replayed(write_grid(tmp_path, 0.70, images=(100, 120)).root)
    val, test = EVAL_S * 100 / 620, EVAL_S * 120 / 620
    spent = 8 * (EPOCH_S[0] + val) + 2 * (sum(EPOCH_S[:3]) + 3 * val) + 4 * FIVE  # finishers: every pass and test
    assert done.race_hours == pytest.approx(spent / 3600)
    assert done.grid_hours == pytest.approx(GRID_H) and done.race_hours < RACE_H
    assert val * 5 + test == pytest.approx(EVAL_S)


def test_a_later_rung_keeps_the_late_config_and_picks_as_the_grid_does(tmp_path):
    write_grid(tmp_path, 0.80)
    done = replayed(tmp_path, RaceSpec(rungs=[4]))  # after 4 epochs 'late' (70%) is second to A (72%): kept
    assert done.pick == done.grid_pick == gid("late") and done.verdict == "same"
    assert [(r.epochs, r.configs_in, r.kept) for r in done.rungs] == [(4, 6, 2)]


def test_the_newest_full_grid_is_replayed_and_a_race_run_is_not(tmp_path):
    store = write_grid(tmp_path, 0.70, run_id="old-grid")
    write_grid(tmp_path, 0.80, run_id="new-grid", when=T0 + timedelta(days=1))
    write_cell(store, "a-race", cell_of("C", 0), [0.3], status="dropped", when=T0 + timedelta(days=2))
    read = store.read(columns=["finished_at"], epochs=False)
    assert replay.choose_run(read.cells, "here") == (SUITE, "new-grid")
    assert replay.choose_run(read.cells, "here", run="old-grid") == (SUITE, "old-grid")
    mine = store.read(runs=["a-race"])
    with pytest.raises(ResultsError, match="is itself a race"):
        replay.replay(mine.cells, mine.epochs, RaceSpec())


@pytest.mark.parametrize("names, with_epochs, message", [
    (("A", "A_lr"), True, "1 config"),  # an lr sweep of one backbone config is one racer: nothing to race
    (tuple(CURVES), False, "no epoch rows"),
])
def test_a_grid_that_cannot_be_raced_is_one_line_naming_why(tmp_path, names, with_epochs, message):
    write_grid(tmp_path, 0.8, names=names, with_epochs=with_epochs)
    result = CliRunner().invoke(main, ["race", "replay", "--results", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_command_prints_the_rungs_and_ends_with_the_summary_line(tmp_path):
    write_grid(tmp_path, 0.80)
    runner = CliRunner()
    result = runner.invoke(main, ["race", "replay", "--results", str(tmp_path), "--suite", SUITE, "--run", "grid-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"race replay: pick {gid('A')} (grid pick {gid('late')}; worse by 6.00 pts), "
                         "device-hours 4.200 of 9.100 (46.2%)")
    assert any(line.split() == ["1", "1", "6", "2", "45.00"] for line in lines)  # rung 1: 6 in, 2 kept, B's line
    result = runner.invoke(main, ["race", "replay", "--results", str(tmp_path), "--eta", "2", "--rungs", "4"])
    assert result.exit_code == 0 and "(grid pick " + gid("late") + "; same)" in result.output.splitlines()[-1]
    for args, said in ((["--run", "grid-rum"], "did you mean: grid-run"), (["--rungs", "1,x"], "--rungs"),
                       (["--suite", "nope"], "no suite 'nope'")):
        result = runner.invoke(main, ["race", "replay", "--results", str(tmp_path), *args])
        assert result.exit_code == 2 and said in result.output, result.output
    assert "replay" in runner.invoke(main, ["race", "--help"]).output
