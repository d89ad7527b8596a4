"""The SLURM executor through submitit's local executor, on the CPU: the smoke suite end to end as jobs, the driver
alone writing the results folder, resume, and a job that dies becoming a killed row; the GPU request against a faked
sinfo, and what a job's row says of its node. Against a real cluster: tests/test_slurm_real.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import apply_overrides, expand, load_suite, parse_suite

submitit = pytest.importorskip("submitit", reason="the SLURM executor needs `pip install 'bench[slurm]'`")

SMOKE = Path(__file__).resolve().parent.parent / "suites" / "smoke.yaml"
TINY_SUITE = {"name": "tiny", "dataset": "synthetic", "defaults": {"steps": 1, "pretrained": False},
              "grid": {"model": ["tv:mobilenet_v3_small"]}}


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


def fake_sinfo(monkeypatch, listing: str):
    from bench.executors import slurm

    def run(argv, **kwargs):
        assert argv[0] == "sinfo"
        return subprocess.CompletedProcess(argv, 0, listing, "")

    monkeypatch.setattr(slurm.subprocess, "run", run)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("BENCH_SLURM_PARAMETERS", raising=False)


@pytest.mark.parametrize("partition, gpus", [("gpu", 1), ("cpu", 0), ("", 0)])
def test_a_job_asks_for_a_gpu_only_where_the_partition_has_them(tmp_path, monkeypatch, capsys, partition, gpus):
    from bench.cellproc import Job
    from bench.executors.slurm import SlurmExecutor

    fake_sinfo(monkeypatch, "cpu*|(null)\ngpu|gpu:a100:4(S:0-1)\ngpu|gpu:a100:2,tmpdisk:100\n")
    monkeypatch.setenv("BENCH_SLURM_FOLDER", str(tmp_path / "jobs"))
    with SlurmExecutor(partition) as executor:
        params = executor._parameters([Job(expand(parse_suite(TINY_SUITE))[0])])
    assert executor.device == ("cuda:0" if gpus else "cpu") and params.get("gpus_per_node") == (gpus or None)
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slurm:")]
    assert said == ([] if gpus else ["slurm: partition cpu has no GPUs (sinfo lists no gpu GRES on its nodes): each "
                                     "cell runs on its node's CPUs; set gpus_per_node in BENCH_SLURM_PARAMETERS to "
                                     "ask for GPUs anyway"])


def test_the_gpu_request_can_be_set_and_an_unknown_partition_is_named(tmp_path, monkeypatch):
    from bench.errors import BenchError
    from bench.executors.slurm import SlurmExecutor

    fake_sinfo(monkeypatch, "cpu*|(null)\n")
    monkeypatch.setenv("BENCH_SLURM_FOLDER", str(tmp_path / "jobs"))
    monkeypatch.setenv("BENCH_SLURM_PARAMETERS", '{"gpus_per_node": 2}')
    with SlurmExecutor("cpu") as executor:
        assert executor.device == "cuda:0"  # asked for: the cluster's sbatch decides
    monkeypatch.delenv("BENCH_SLURM_PARAMETERS")
    with pytest.raises(BenchError, match=r"^--slurm gpu: the cluster has no such partition; its partitions are cpu$"):
        SlurmExecutor("gpu").__enter__()


def test_a_job_s_row_names_its_node_and_physical_gpu_and_its_log_the_job(monkeypatch):
    from bench import cellproc
    from bench.cellproc import Job, Outcome
    from bench.executors import slurm
    from bench.result import Provenance

    def run_cell(job, device, server, report, stop):
        return Outcome("ok", parts={"provenance": Provenance(device="cuda:0", hostname="n1.cluster")}, log="trained\n")

    monkeypatch.setattr(cellproc, "run_cell", run_cell)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    import signal

    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2))
    outcome = slurm.run_on_node(Job(expand(parse_suite(TINY_SUITE))[0]), "cuda:0")
    machine = outcome.parts["provenance"]
    assert (machine.device, machine.hostname, machine.scheduler_job_id) == ("cuda:3", "n1", "4242")
    assert outcome.log == "SLURM job 4242 on node n1, GPU 3\ntrained\n"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == handlers  # put back


def test_the_cluster_scripts_pass_shellcheck():
    import sys

    root = Path(__file__).resolve().parent.parent
    scripts = [root / "ci" / "slurm" / "up.sh", root / "ci" / "slurm" / "down.sh", root / ".ci" / "run"]
    out = subprocess.run([str(Path(sys.executable).with_name("shellcheck")), *map(str, scripts)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout
