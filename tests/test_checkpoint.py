"""A cell pauses and resumes at epoch boundaries: resumed, it ends bit for bit where the same cell run straight
through ends (CPU); a state that is corrupt or another config's is said in one line and the cell starts over."""

from __future__ import annotations

import json

import pytest
import torch

from bench import data, models, train
from bench.suite import Cell
from bench.train.checkpoint import META, STATE, Checkpoint

CPU = torch.device("cpu")
# Augmentation (the loader's shuffle and crops) and head dropout (torch's global RNG): every RNG a resume restores.
CELL = Cell(model="tv:resnet18", dataset="synthetic", resolution=32, batch_size=16, train_subset=64, test_subset=32,
            pretrained=False, epochs=4, head_dropout=0.2, val_fraction=0.25, checkpoint="epoch")
TIMES = ("epoch_s", "images_per_s")


@pytest.fixture(autouse=True)
def _one_thread(small_cpu_kernels):
    yield


def run(cell: Cell, checkpoint: Checkpoint | None):
    """One segment as the worker runs it: seed, data, a freshly built model, train."""
    torch.manual_seed(cell.seed)
    splits = data.load_splits(cell.dataset, val_fraction=cell.val_fraction, train_subset=cell.train_subset,
                              test_subset=cell.test_subset)
    backbone = models.build(cell, len(splits.classes))
    return train.run_cell(cell, splits, backbone, CPU, len(splits.classes), lambda e: None, checkpoint), backbone.model


def without_times(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMES} for e in epochs]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("restore_best", [True, False])
def test_paused_after_two_epochs_and_resumed_equals_straight_through(tmp_path, restore_best):
    cell = CELL.model_copy(update={"restore_best": restore_best})
    straight, straight_model = run(cell, None)
    paused, _ = run(cell, Checkpoint(tmp_path / "state", cell, pause_at=2))
    assert paused.paused and len(paused.epochs) == 2 and (tmp_path / "state" / META).is_file()
    resumed, resumed_model = run(cell, Checkpoint(tmp_path / "state", cell))
    assert not resumed.paused
    assert without_times(resumed.epochs) == without_times(straight.epochs)
    assert same_weights(resumed_model, straight_model)
    for column in ("top1", "top5", "test_correct", "val_top1_best", "val_top1_tested", "test_epoch", "steps_run"):
        assert resumed.row[column] == straight.row[column], column
    assert (resumed.row["resumed_from_epoch"], resumed.row["segments"]) == (2, 2)
    assert (straight.row["resumed_from_epoch"], straight.row["segments"]) == (0, 1)
    # train and eval time add up over the segments: the resumed row counts the first segment's epochs too
    assert resumed.row["train_s"] > sum(e["epoch_s"] for e in resumed.epochs[2:])


def test_a_cell_without_checkpointing_saves_nothing(tmp_path):
    cell = CELL.model_copy(update={"checkpoint": "none", "epochs": 2})
    run(cell, Checkpoint(tmp_path / "state", cell))
    assert not (tmp_path / "state").exists()
    # auto saves only once an epoch takes over a minute: these take well under one
    run(cell.model_copy(update={"checkpoint": "auto"}), Checkpoint(tmp_path / "state", cell))
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("damage", ["truncated", "other_config", "other_version"])
def test_an_unusable_state_is_said_in_one_line_and_the_cell_starts_over(tmp_path, damage):
    cell = CELL.model_copy(update={"epochs": 2})
    folder = tmp_path / "state"
    run(cell, Checkpoint(folder, cell, pause_at=1))
    meta = json.loads((folder / META).read_text())
    if damage == "truncated":
        (folder / STATE).write_bytes((folder / STATE).read_bytes()[:100])
    elif damage == "other_config":
        meta["cell"] = meta["cell"].replace("resnet18", "resnet34")
    else:
        meta["bench_version"] = "0.0.1"
    if damage != "truncated":
        (folder / META).write_text(json.dumps(meta))
    said: list[str] = []
    outcome, _ = run(cell, Checkpoint(folder, cell, warn=said.append))
    straight, _ = run(cell, None)
    assert len(said) == 1 and "starts over from epoch 0" in said[0] and cell.id in said[0]
    assert outcome.row["resumed_from_epoch"] == 0 and outcome.row["top1"] == straight.row["top1"]


def test_a_cell_killed_after_two_epochs_resumes_on_the_next_run_and_matches_a_straight_run(tmp_path, monkeypatch):
    from bench.runner import RunOptions, run_suite
    from bench.store import ResultStore
    from bench.suite import expand, parse_suite

    suite = parse_suite({"name": "resume", "dataset": "synthetic", "grid": {"model": ["tv:resnet18"]},
                         "defaults": {**CELL.model_dump(include={"resolution", "batch_size", "train_subset",
                                                                 "test_subset", "pretrained", "val_fraction"}),
                                      "epochs": 4, "checkpoint": "epoch"}})
    cells = expand(suite)
    straight = run_suite(suite, cells, RunOptions(results=tmp_path / "straight")).rows[0]
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[0].id: "sigkill_at_epoch:2"}))
    killed = run_suite(suite, cells, RunOptions(results=tmp_path / "r")).rows[0]
    store = ResultStore(tmp_path / "r")
    assert killed["status"] == "killed" and store.saved_state("resume", cells[0].id)["epochs_done"] == 2
    monkeypatch.delenv("BENCH_FAULTS")
    resumed = run_suite(suite, cells, RunOptions(results=tmp_path / "r")).rows  # a plain run: killed with a state
    assert [r["status"] for r in resumed] == ["ok"]
    assert (resumed[0]["resumed_from_epoch"], resumed[0]["segments"]) == (2, 2)
    for column in ("top1", "test_correct", "val_top1_tested", "epochs_run", "steps_run"):
        assert resumed[0][column] == straight[column], column
    assert store.saved_state("resume", cells[0].id) is None  # deleted once the row is written
    epochs = store.read().epochs
    final = epochs[epochs["run_id"] == resumed[0]["run_id"]].sort_values("epoch")
    assert final["epoch"].tolist() == [0, 1, 2, 3]  # the resumed row carries every epoch, the first segment's too
    assert run_suite(suite, cells, RunOptions(results=tmp_path / "r")).rows == []  # and it is done now
