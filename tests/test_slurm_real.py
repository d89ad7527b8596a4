"""The SLURM executor against a real SLURM cluster: sbatch, sacct and scancel through submitit's slurm executor, on
the single-node cluster `ci/slurm/up.sh` brings up on this machine (`.ci/run` starts it). Without one these tests
are skipped, with the reason.

What they cost: each job is a fresh interpreter that imports torch twice (the job, the cell's process), and SLURM
enforces a time limit of a minute at the earliest, so the module takes about four minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import expand, parse_suite

pytest.importorskip("submitit", reason="the SLURM executor needs `pip install 'bench[slurm]'`")
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

STATE = Path(os.environ.get("BENCH_SLURM_STATE", "/tmp/bench-slurm-cluster"))
TINY = {"batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False, "resolution": 32, "epochs": 1,
        "infer_bench": "off"}
# A cell whose epochs take a second or two, long enough to act between them (scancel, requeue).
SLOW = {**TINY, "train_subset": 128, "epochs": 8, "checkpoint": "epoch"}


@pytest.fixture(scope="module")
def cluster():
    """The test cluster's environment (SLURM_CONF), or a skip that says why there is none."""
    why = os.environ.get("BENCH_SLURM_UNAVAILABLE")
    if why:
        pytest.skip(f"no SLURM cluster: {why}")
    if not (STATE / "env").is_file():
        pytest.skip(f"no SLURM cluster: {STATE}/env not found; bring one up with `bash ci/slurm/up.sh` (as root)")
    env = {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")}
    alive = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=30)
    if alive.returncode != 0 or "UP" not in alive.stdout:
        pytest.skip(f"no SLURM cluster: `scontrol ping` says {alive.stdout.strip() or alive.stderr.strip()}")
    return env


@pytest.fixture
def slurm(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("BENCH_SLURM_FOLDER", str(tmp_path / "jobs"))
    monkeypatch.delenv("BENCH_SLURM_PARAMETERS", raising=False)
    yield cluster
    subprocess.run(["scancel", "--name=bench"], env=cluster, capture_output=True, timeout=30)


def suite_of(name: str, defaults: dict, seeds: list[int]):
    return parse_suite({"name": name, "dataset": "synthetic", "defaults": {**defaults, "seeds": seeds},
                        "grid": {"model": ["tv:mobilenet_v3_small"]}})


def sacct_state(job_id: str, env: dict) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return out.strip().split(" ")[0]


def job_ids(logs: Path) -> dict[str, str]:
    """cell id -> the SLURM job id its log names."""
    out = {}
    for log in logs.glob("*.log"):
        first = log.read_text().splitlines()[0]
        named = re.match(r"SLURM job (\d+)\b", first)
        assert named, first
        out[log.name.split("--")[0]] = named.group(1)
    return out


def test_a_suite_runs_as_sbatch_jobs_and_a_job_past_its_time_limit_is_a_timeout_row(slurm, tmp_path, monkeypatch,
                                                                                   capfd):
    suite = suite_of("slurm", TINY, [0, 1, 2])
    cells = expand(suite)
    # One job sleeps past the jobs' time limit of one minute (SLURM's shortest): the scheduler's TIMEOUT.
    monkeypatch.setenv("BENCH_SLURM_PARAMETERS", json.dumps({"timeout_min": 1}))
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[2].id: "sleep:600"}))
    summary = run_suite(suite, cells, RunOptions(results=tmp_path / "results", slurm="debug"))
    rows = {r["cell_id"]: r for r in summary.rows}
    assert [rows[c.id]["status"] for c in cells] == ["ok", "ok", "timeout"]
    assert "(TIMEOUT)" in rows[cells[2].id]["error"]
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], env=slurm, capture_output=True, text=True).stdout.strip()
    for cell in cells[:2]:
        row = rows[cell.id]
        assert 0 <= row["top1"] <= 1 and row["hostname"] == node and row["device"] == "cpu"
        assert row["start_method"] == "subprocess"
    ids = job_ids(tmp_path / "results" / "slurm" / "logs")
    assert sorted(ids) == sorted(c.id for c in cells)  # every row's log names its job, and the row holds it
    assert all(rows[c.id]["scheduler_job_id"] == ids[c.id] for c in cells)
    assert [sacct_state(ids[c.id], slurm) for c in cells] == ["COMPLETED", "COMPLETED", "TIMEOUT"]
    assert ids[cells[2].id] in rows[cells[2].id]["error"]
    # A CPU-only partition: said once, and no job asked for a GPU (sbatch refuses any gres there).
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("slurm:")]
    assert len(said) == 1 and "partition debug has no GPUs" in said[0], said
    scripts = list((tmp_path / "jobs").glob("*/*_submission.sh"))
    assert len(scripts) == 3 and not any("gpu" in s.read_text() for s in scripts)
    back = ResultStore(tmp_path / "results").read()
    assert sorted(back.cells["cell_id"]) == sorted(rows) and not back.problems


def test_a_gpu_asked_of_a_partition_without_gpus_is_one_error_line(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_SLURM_PARAMETERS", json.dumps({"gpus_per_node": 1}))
    suite = suite_of("gres", TINY, [0])
    with pytest.raises(BenchError, match=r"^SLURM refused a job \(sbatch: error: Invalid generic resource") as raised:
        run_suite(suite, expand(suite), RunOptions(results=tmp_path / "r", slurm="debug"))
    assert "\n" not in str(raised.value)


def test_an_unknown_partition_is_one_error_line_that_lists_the_cluster_s(slurm, tmp_path):
    suite = suite_of("nopart", TINY, [0])
    with pytest.raises(BenchError, match=r"--slurm gpu-a100: the cluster has no such partition; its partitions "
                                         r"are debug"):
        run_suite(suite, expand(suite), RunOptions(results=tmp_path / "r", slurm="gpu-a100"))
    assert not (tmp_path / "r").exists()


def act_after_first_epoch(store: ResultStore, suite: str, cell_id: str, env: dict, *commands: list[str]):
    """A thread that waits for the cell's first saved epoch, then runs `commands` on its job (JOB in them)."""
    done: dict = {}

    def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            meta = store.saved_state(suite, cell_id)
            if meta and meta["epochs_done"] >= 1:
                job = subprocess.run(["squeue", "-h", "-o", "%i", "--name=bench"], env=env, capture_output=True,
                                     text=True).stdout.split()
                done["epochs"], done["job"] = meta["epochs_done"], job[0]
                for command in commands:
                    subprocess.run([job[0] if a == "JOB" else a for a in command], env=env, check=True, timeout=30)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


def test_a_cancelled_job_is_a_killed_row_and_the_next_run_resumes_its_cell(slurm, tmp_path):
    suite = suite_of("scancel", SLOW, [0])
    cells = expand(suite)
    store = ResultStore(tmp_path / "results")
    options = RunOptions(results=tmp_path / "results", slurm="debug")
    thread, acted = act_after_first_epoch(store, "scancel", cells[0].id, slurm, ["scancel", "JOB"])
    killed = run_suite(suite, cells, options).rows
    thread.join()
    assert [r["status"] for r in killed] == ["killed"] and acted["job"] in killed[0]["error"]
    assert "CANCELLED" in killed[0]["error"] and sacct_state(acted["job"], slurm) == "CANCELLED"
    saved = store.saved_state("scancel", cells[0].id)["epochs_done"]
    assert saved >= 1
    resumed = run_suite(suite, cells, options).rows  # killed, with a saved state: the plain next run resumes it
    assert [r["status"] for r in resumed] == ["ok"]
    assert resumed[0]["resumed_from_epoch"] == saved and resumed[0]["segments"] == 2
    assert resumed[0]["epochs_run"] == SLOW["epochs"]
    again = run_suite(suite, cells, options)
    assert again.rows == [] and again.skipped == 1  # resumed exactly once


def test_a_requeued_job_resumes_from_its_last_saved_epoch_in_the_same_run(slurm, tmp_path):
    suite = suite_of("requeue", SLOW, [0])
    cells = expand(suite)
    store = ResultStore(tmp_path / "results")
    # As a preemption with PreemptMode=REQUEUE does: SIGTERM, SIGKILL, back to the queue. SLURM holds a requeued
    # job back for two minutes; the test lets it start at once.
    thread, acted = act_after_first_epoch(store, "requeue", cells[0].id, slurm, ["scontrol", "requeue", "JOB"])
    starter = threading.Thread(target=start_when_pending, args=(acted, slurm), daemon=True)
    starter.start()
    rows = run_suite(suite, cells, RunOptions(results=tmp_path / "results", slurm="debug")).rows
    thread.join()
    starter.join()
    assert [r["status"] for r in rows] == ["ok"], rows[0]["error"]
    assert rows[0]["resumed_from_epoch"] >= 1 and rows[0]["segments"] == 2
    assert rows[0]["resumed_from_epoch"] >= acted["epochs"]
    deadline = time.monotonic() + 60  # the result is back before the job has quite ended
    while sacct_state(acted["job"], slurm) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert sacct_state(acted["job"], slurm) == "COMPLETED"  # one job, run twice: the row is its second run's


def start_when_pending(acted: dict, env: dict) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if "job" in acted:
            state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", acted["job"]], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if state == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={acted['job']}", "StartTime=now"], env=env, timeout=30)
                return
        time.sleep(0.5)


def test_a_job_over_its_memory_limit_is_an_oom_row(slurm, tmp_path, monkeypatch):
    if (STATE / "memory_enforced").read_text().strip() != "yes":
        pytest.skip("this machine's cgroups do not let slurmd enforce memory (up.sh fell back to task/none)")
    suite = suite_of("oom", TINY, [0])
    cells = expand(suite)
    monkeypatch.setenv("BENCH_SLURM_PARAMETERS", json.dumps({"slurm_mem": "1500M"}))
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[0].id: f"alloc:{3 * 2**30}"}))
    rows = run_suite(suite, cells, RunOptions(results=tmp_path / "results", slurm="debug")).rows
    assert [r["status"] for r in rows] == ["oom"], rows[0]["error"]
    assert "OUT_OF_MEMORY" in rows[0]["error"]
