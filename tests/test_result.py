"""The typed result (bench/result.py): the schema is derived from its parts, keeps every column an earlier bench
wrote, refuses a column in two parts, and results written by an earlier bench still load and report."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pytest

from bench import result
from bench.report.build import build_report
from bench.report.select import normalise
from bench.result import (CELL_SCHEMA, EPOCH_SCHEMA, Accuracy, Build, CellResult, Identity, Part, Process, Provenance,
                          Training, arrow_type, parts_from_values)
from bench.store import ResultStore
from bench.suite import Cell

SESSION3 = Path(__file__).parent / "data" / "results_session3"


def test_the_derived_schema_keeps_every_column_of_the_hand_kept_one_with_its_type():
    old = json.loads((SESSION3 / "schema.json").read_text())
    for kind, schema in (("cells", CELL_SCHEMA), ("epochs", EPOCH_SCHEMA)):
        new = {f.name: str(f.type) for f in schema}
        assert {k: new.get(k) for k in old[kind]} == old[kind], kind


@pytest.mark.parametrize("hint, kind", [
    (int | None, pa.int64()), (float, pa.float64()), (bool | None, pa.bool_()), (str, pa.string()),
    (Literal["a", "b"], pa.string()), (tuple[float, float, float] | None, pa.list_(pa.float64())),
    (list[list[int]] | None, pa.list_(pa.list_(pa.int64()))), (datetime | None, pa.timestamp("us", tz="UTC")),
])
def test_annotations_map_to_one_parquet_type(hint, kind):
    assert arrow_type(hint) == kind


@pytest.mark.parametrize("hint", [int | str, Literal["a", 1], dict[str, int]])
def test_an_annotation_without_one_parquet_type_is_refused(hint):
    with pytest.raises(TypeError):
        arrow_type(hint)


def test_the_config_columns_follow_the_cell_fields():
    # A field added to Cell is a column without touching the store; `freeze` is the label, `suite` identity's.
    assert set(result.config_columns()) == set(Cell.model_fields) - {"suite"}
    columns = result.config_columns()
    assert (columns["freeze"], columns["resolution"], columns["lr"], columns["precision"], columns["cudnn_benchmark"],
            columns["input_std"]) == (pa.string(), pa.int64(), pa.float64(), pa.string(), pa.bool_(),
                                      pa.list_(pa.float64()))


@dataclass(kw_only=True)
class _Clash(Part):
    top1: float | None = None  # Accuracy's


@dataclass(kw_only=True)
class _BadResolve(Part):
    RESOLVES = frozenset({"batch_size"})
    batch_size: str | None = None  # the config's is an integer


def test_a_column_in_two_parts_is_refused_when_the_schema_is_built(monkeypatch):
    monkeypatch.setitem(result.PARTS, "clash", _Clash)
    with pytest.raises(TypeError, match="'top1' is in both accuracy and clash"):
        result._cell_schema()
    monkeypatch.delitem(result.PARTS, "clash")
    monkeypatch.setitem(result.PARTS, "bad", _BadResolve)
    with pytest.raises(TypeError, match="'batch_size': bad resolves it as string, the config has int64"):
        result._cell_schema()


def test_a_part_sent_with_a_column_it_does_not_have_is_named():
    with pytest.raises(ValueError, match=r"Accuracy has no columns \['top3'\]"):
        parts_from_values({"accuracy": {"top1": 0.5, "top3": 0.9}})
    with pytest.raises(ValueError, match=r"no result parts named \['timing'\]"):
        parts_from_values({"timing": {}})


def test_a_result_writes_and_reads_back_every_part_and_resolved_values_replace_the_config(tmp_path):
    cell = Cell(model="tv:resnet18", precision="auto", freeze=0.5, input_mean=(0.1, 0.2, 0.3), suite="s")
    when = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    identity = Identity(run_id="r1", suite="s", suite_hash="h", cell_id=cell.id, group_id=cell.group_id,
                        status="ok", cell_json=cell.canonical())
    parts = {"training": Training(precision="bf16", lr=0.05, train_s=1.5),
             "accuracy": Accuracy(top1=0.75, confusion_matrix=[[3, 1], [0, 4]], per_class_top1=[0.75, 1.0]),
             "build": Build(class_names=["a", "b"], input_mean=[0.4, 0.5, 0.6]),
             "process": Process(started_at=when, finished_at=when, wall_s=2.0),
             "provenance": Provenance(device="cpu", torch_threads=2)}
    row = CellResult(identity, cell, parts).row()
    assert (row["precision"], row["lr"], row["freeze"], row["input_mean"]) == ("bf16", 0.05, "0.5", [0.4, 0.5, 0.6])
    assert "peak_vram_allocated_bytes" not in row  # no peaks part: its columns are written empty
    assert row["cudnn_benchmark"] is True  # the provenance part did not measure it: the cell's setting stays
    ResultStore(tmp_path).write(row, [{"epoch": 0, "step": 3, "val_top1": 0.7}])
    back = ResultStore(tmp_path).read()
    got = back.cells.iloc[0]
    assert got["top1"] == 0.75 and [list(r) for r in got["confusion_matrix"]] == [[3, 1], [0, 4]]
    assert list(got["class_names"]) == ["a", "b"] and got["finished_at"] == when and got["torch_threads"] == 2
    assert pd.isna(got["peak_vram_allocated_bytes"])
    assert back.epochs["val_top1"].tolist() == [0.7] and not back.problems


def test_results_of_an_earlier_bench_load_and_report_beside_new_rows(tmp_path):
    if not (SESSION3 / "session3" / "cells").is_dir():
        pytest.fail(f"the fixture {SESSION3} is missing")
    root = tmp_path / "results"
    shutil.copytree(SESSION3 / "session3", root / "session3")
    # A row of today's bench in the same suite folder: one scan reads both.
    cell = Cell(model="tv:resnet18", suite="session3", seed=7)
    identity = Identity(run_id="20991231T000000Z-new000", suite="session3", suite_hash="x", cell_id=cell.id,
                        group_id=cell.group_id, status="ok", cell_json=cell.canonical())
    now = datetime.now(timezone.utc)
    new = CellResult(identity, cell, {"accuracy": Accuracy(top1=0.5, val_top1_best=0.5),
                                      "process": Process(started_at=now, finished_at=now)}).row()
    ResultStore(root).write(new, [])
    read = ResultStore(root).read()
    assert not read.problems and len(read.cells) == 7
    assert sorted(read.cells["status"]) == ["error"] + ["ok"] * 6
    shown = normalise(read.cells)
    assert shown["train_s"].notna().sum() == 5  # the five old ok rows kept their timings
    report = build_report(root, tmp_path / "report")
    text = Path(report.markdown).read_text()
    assert "tv:mobilenet_v3_small" in text and "tv:resnet18" in text
