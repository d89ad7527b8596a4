"""A config is ranked on the validation score of the weights its test figure came from (`val_top1_tested`):
with restore_best off those are the last epoch's, not the best epoch's."""

from __future__ import annotations

import datetime as dt

from bench.report import tables
from bench.report.select import select_rows
from bench.store import ResultStore
from bench.suite import Cell

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _write(store: ResultStore, cell: Cell, **values) -> None:
    row = {**cell.model_dump(), "freeze": str(cell.freeze), "run_id": "r1", "cell_id": cell.id,
           "group_id": cell.group_id, "status": "ok", "train_s": 10.0, "started_at": T0, "finished_at": T0, **values}
    store.write(row, [])


def _ranked(root) -> list[str]:
    read = ResultStore(root).read()
    current = select_rows(read.cells, read.epochs, str(root)).current
    return tables.config_table(current, ["model"])["model"].tolist()


def test_a_config_tested_on_its_last_epoch_is_ranked_on_that_epochs_validation(tmp_path):
    store = ResultStore(tmp_path)
    # resnet18 peaked at 0.90 but was tested on its last epoch's weights (0.60); resnet34 was tested at 0.80.
    _write(store, Cell(suite="s", model="tv:resnet18", restore_best=False), top1=0.61,
           val_top1_best=0.90, val_top1_final=0.60, val_top1_tested=0.60)
    _write(store, Cell(suite="s", model="tv:resnet34"), top1=0.79,
           val_top1_best=0.80, val_top1_final=0.70, val_top1_tested=0.80)
    assert _ranked(tmp_path) == ["tv:resnet34", "tv:resnet18"]


def test_rows_from_before_the_column_fall_back_to_the_weights_they_tested(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, Cell(suite="s", model="tv:resnet18", restore_best=False), top1=0.61,
           val_top1_best=0.90, val_top1_final=0.60)
    _write(store, Cell(suite="s", model="tv:resnet34"), top1=0.79, val_top1_best=0.80, val_top1_final=0.70)
    read = ResultStore(tmp_path).read()
    current = select_rows(read.cells, read.epochs, str(tmp_path)).current.set_index("model")
    assert current.loc["tv:resnet18", "val_top1_tested"] == 0.60
    assert current.loc["tv:resnet34", "val_top1_tested"] == 0.80
    assert _ranked(tmp_path) == ["tv:resnet34", "tv:resnet18"]
