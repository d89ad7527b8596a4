"""The SLURM executor through submitit's local executor, on the CPU: the smoke suite end to end as jobs, the driver
alone writing the results folder, resume, and a job that dies becoming a killed row."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import apply_overrides, expand, load_suite, parse_suite

submitit = pytest.importorskip("submitit", reason="the SLURM executor needs `pip install 'bench[slurm]'`")

SMOKE = Path(__file__).resolve().parent.parent / "suites" / "smoke.yaml"


def test_the_smoke_suite_runs_as_jobs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_SLURM_FOLDER", str(tmp_path / "jobs"))
    # The smoke suite's four cells, one epoch each and without the inference measurement (4 s a cell): a job is a
    # fresh process that imports torch, and the jobs run one at a time, so this keeps the test near a minute.
    suite = apply_overrides(load_suite(SMOKE), ["infer_bench=off", "epochs=1"])
    cells = expand(suite)
    options = RunOptions(results=tmp_path / "results", slurm="local")
    summary = run_suite(suite, cells, options)
    rows = {r["cell_id"]: r for r in summary.rows}
    assert sorted(rows) == sorted(c.id for c in cells) and {r["status"] for r in rows.values()} == {"ok"}
    assert {r["start_method"] for r in rows.values()} == {"subprocess"}  # a job is a fresh process anyway
    assert all(r["top1"] is not None and r["peak_host_pss_bytes"] > 0 for r in rows.values())
    back = ResultStore(tmp_path / "results").read()
    assert sorted(back.cells["cell_id"]) == sorted(rows) and not back.problems
    assert len(list((tmp_path / "results" / "smoke" / "logs").glob("*.log"))) == len(cells)
    assert list((tmp_path / "jobs").iterdir())  # submitit's job files live in the job folder, not the results
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [".lock", "smoke"]
    again = run_suite(suite, cells, options)
    assert again.rows == [] and again.skipped == len(cells)


def test_a_job_that_dies_becomes_a_killed_row(tmp_path, monkeypatch):
    from bench.executors import slurm

    monkeypatch.setenv("BENCH_SLURM_FOLDER", str(tmp_path / "jobs"))

    def die(*args):
        import os

        os._exit(1)  # the job's process goes away without a result, as when a node is lost

    monkeypatch.setattr(slurm, "run_on_node", die)
    suite = parse_suite({"name": "dies", "dataset": "synthetic", "defaults": {"steps": 1, "pretrained": False},
                         "grid": {"model": ["tv:mobilenet_v3_small"]}})
    summary = run_suite(suite, expand(suite), RunOptions(results=tmp_path / "results", slurm="local"))
    assert [r["status"] for r in summary.rows] == ["killed"]
    assert "ended without a result" in summary.rows[0]["error"]
