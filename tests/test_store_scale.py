"""Reading a long history: one scan over loose and compacted files, filters applied before files are opened,
and `bench compact` (one file per run, atomic, never while a run holds the folder, every row kept).
The timing of 20,000 files is a benchmark (benchmarks/report_scale.py), not a test."""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.errors import ResultsError
from bench.report.select import normalise
from bench.store import CELL_SCHEMA, ResultStore

T0 = dt.datetime(2026, 1, 1, 2, tzinfo=dt.timezone.utc)


def row(suite: str, cell: str, run: str, night: int, **fields) -> dict:
    when = T0 + dt.timedelta(days=night, minutes=int(cell[-1], 16))
    return {"run_id": run, "suite": suite, "cell_id": cell, "group_id": cell, "status": "ok", "model": "tv:resnet18",
            "resolution": 32, "batch_size": 32, "freeze": "none", "seed": 0, "top1": 0.5 + 0.01 * night,
            "images_per_s": 100.0 + night, "class_names": ["a", "b"], "confusion_matrix": [[3, 1], [0, 4]],
            "input_mean": [0.5, 0.5, 0.5], "test_correct": "8A==", "train_s": 10.0, "wall_s": 20.0,
            "started_at": when - dt.timedelta(seconds=20), "finished_at": when, **fields}


def epochs(n: int = 2) -> list[dict]:
    return [{"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0 / (e + 1), "val_top1": 0.4 + 0.1 * e} for e in range(n)]


@pytest.fixture
def history(tmp_path) -> ResultStore:
    """Three nights of suite `a` (four cells each) and one of suite `b`, written as `bench run` writes them."""
    store = ResultStore(tmp_path / "results")
    for night in range(3):
        for cell in ("c0", "c1", "c2", "c3"):
            store.write(row("a", cell, f"run{night}", night), epochs())
    store.write(row("b", "c9", "runb", 0, status="unavailable", top1=None), [])
    return store


def files(store: ResultStore, pattern: str = "*") -> list[str]:
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.glob(f"*/*/{pattern}"))


def test_compaction_keeps_every_row_in_one_file_per_run(history):
    before = history.read()
    done_before = history.done_cell_ids("a"), history.done_cell_ids("b")
    assert len(before.cells) == 13 and len(before.epochs) == 24 and before.problems == []
    out = CliRunner().invoke(main, ["compact", "--results", str(history.root)])
    assert out.exit_code == 0 and "compacted 4 runs (26 files folded)" in out.output
    assert files(history, "*.parquet") == [f"a/{kind}/run{n}.run.parquet" for kind in ("cells", "epochs") for n in range(3)] + [
        "b/cells/runb.run.parquet", "b/epochs/runb.run.parquet"]
    assert not list(history.root.rglob(".*.tmp"))
    after = history.read()
    pd.testing.assert_frame_equal(before.cells, after.cells)
    pd.testing.assert_frame_equal(before.epochs, after.epochs)
    assert (history.done_cell_ids("a"), history.done_cell_ids("b")) == done_before == ({"c0", "c1", "c2", "c3"}, set())
    # A new run beside compacted ones, then compacting again: only the new run is folded.
    history.write(row("a", "c0", "run3", 3), epochs())
    assert len(history.read().cells) == 14
    assert history.compact().runs == 1 and len(history.read().cells) == 14


def test_a_compaction_cut_short_leaves_no_row_twice(history):
    loose = history.root / "a" / "cells" / "c1--run1.parquet"
    kept = loose.read_bytes()
    history.compact()
    loose.write_bytes(kept)  # killed between writing the run file and deleting this one
    read = history.read()
    assert len(read.cells) == 13 and read.cells.duplicated(["suite", "cell_id", "run_id"]).sum() == 0
    history.compact()
    assert not loose.exists() and len(pq.read_table(history.root / "a" / "cells" / "run1.run.parquet")) == 4


def test_compaction_refuses_while_a_run_holds_the_folder(history):
    before = files(history)
    with history.lock():
        with pytest.raises(ResultsError, match="compact it after that run has finished"):
            history.compact()
        out = CliRunner().invoke(main, ["compact", "--results", str(history.root)])
    assert out.exit_code == 2 and out.output.startswith("error: a bench run is writing to")
    assert files(history) == before


def test_filters_apply_before_files_are_opened(history):
    # A broken file of run0 is never opened when run0 is not asked for: no problem reported.
    (history.root / "a" / "cells" / "zz--run0.parquet").write_bytes(b"not parquet")
    read = history.read(runs={"run2"})
    assert set(read.cells["run_id"]) == {"run2"} and len(read.cells) == 4 and read.problems == []
    assert set(read.epochs["run_id"]) == {"run2"}
    read = history.read(suites=["b"], columns=["top1"], epochs=False)
    assert list(read.cells.columns) == ["suite", "cell_id", "run_id", "status", "model", "top1"]
    assert read.epochs.empty and set(read.cells["suite"]) == {"b"}
    assert any("zz--run0.parquet" in p for p in history.read().problems)
    history.compact()  # the same filters on compacted runs
    assert set(history.read(runs={"run1"}).cells["run_id"]) == {"run1"}


def test_old_odd_and_bad_files(history):
    cells = history.root / "a" / "cells"
    # A file of an older bench: a handful of columns, none of the newer ones.
    pq.write_table(pa.table({"run_id": ["old"], "suite": ["a"], "cell_id": ["c0"], "status": ["ok"],
                             "model": ["tv:resnet18"], "top1": [0.4]}), cells / "c0--old.parquet")
    # A column of another type than the schema's (resolution as text): read on its own.
    odd = pa.Table.from_pylist([row("a", "c5", "odd", 5)], schema=CELL_SCHEMA)
    odd = odd.set_column(odd.schema.get_field_index("resolution"), "resolution", pa.array(["32px"]))
    pq.write_table(odd, cells / "c5--odd.parquet")
    (cells / "broken--run9.parquet").write_bytes(b"PAR1 truncated")
    pq.write_table(pa.table({"foo": [1]}), cells / "foreign.parquet")
    read = history.read()
    assert set(read.cells["run_id"]) == {"run0", "run1", "run2", "runb", "old", "odd"}
    assert [p.split("/")[-1].split(":")[0] for p in read.problems] == ["broken--run9.parquet", "foreign.parquet"]
    assert "not a readable Parquet file" in read.problems[0] and "not a bench results file" in read.problems[1]
    shown = normalise(read.cells)  # older rows get the newer columns, empty
    assert shown.loc[shown["run_id"] == "old", "images_per_s"].isna().all()
    done = history.compact()
    # Bad files stay where they are, named; the odd and the old are folded with every column they had.
    assert {p.split("/")[-1].split(":")[0] for p in done.problems} == {"broken--run9.parquet"}
    assert (cells / "broken--run9.parquet").exists() and (cells / "foreign.parquet").exists()
    assert pq.read_table(cells / "odd.run.parquet").column("resolution").to_pylist() == ["32px"]
    assert pq.read_table(cells / "old.run.parquet").num_rows == 1
    again = history.read()
    assert len(again.cells) == len(read.cells)


def test_a_run_whose_files_disagree_on_types_is_left_alone(tmp_path):
    store = ResultStore(tmp_path)
    store.write(row("a", "c0", "mixed", 0), [])
    odd = pa.Table.from_pylist([row("a", "c1", "mixed", 0)], schema=CELL_SCHEMA)
    odd = odd.set_column(odd.schema.get_field_index("resolution"), "resolution", pa.array(["32px"]))
    pq.write_table(odd, tmp_path / "a" / "cells" / "c1--mixed.parquet")
    done = store.compact()
    assert done.runs == 0 and "disagree on column types" in done.problems[0]
    assert len(list((tmp_path / "a" / "cells").glob("*--mixed.parquet"))) == 2


def test_report_reads_a_compacted_history(history, tmp_path):
    from bench.report import build_report

    history.compact()
    shutil.rmtree(history.root / "b")  # the unavailable-only suite has nothing to show
    outcome = build_report(history.root, tmp_path / "report", suite="a")
    assert outcome.rows == 4 and not [p for p in outcome.problems if "different machines" not in p]
    assert "run2" in outcome.markdown.read_text()
