"""The cell process: children forked from the fork server behave as fresh processes do (environment, session,
threads, exit codes, death with the runner), the start method falls back and is recorded, and host memory is
measured as PSS, which counts pages a forked child shares once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench import cellproc, forkserver, measure
from bench.errors import BenchError
from bench.runner import RunOptions, run_suite
from bench.suite import expand, parse_suite

TINY = {"steps": 2, "batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False,
        "resolution": 32, "epochs": 1, "infer_bench": "off"}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux's (PDEATHSIG)")


def tiny_suite(name: str, seeds: list[int]):
    return parse_suite({"name": name, "dataset": "synthetic", "defaults": {**TINY, "seeds": seeds},
                        "grid": {"model": ["tv:mobilenet_v3_small"]}})


def child_state(code: int) -> int:
    """A fork server target: print what a cell's process would see, exit with `code`."""
    import torch

    print(json.dumps({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_WAIT_POLICY"),
                      "marker": os.environ.get("BENCH_TEST_MARKER"), "own_session": os.getsid(0) == os.getpid(),
                      "cuda_initialised": torch.cuda.is_initialized(), "cwd": os.getcwd()}), flush=True)
    print("to the log", file=sys.stderr, flush=True)
    return code


def fresh_threads(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@linux_only
def test_a_forked_child_sees_what_a_fresh_process_would(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_TEST_MARKER", "before")
    env = cellproc.child_env("cpu")
    log = tmp_path / "stderr.log"
    with forkserver.ForkServer(env, ["torch"]) as server, open(log, "w") as err:
        monkeypatch.setenv("BENCH_TEST_MARKER", "after")  # read when used: the child's own environment wins
        child = server.start("test_cellproc:child_state", [3], cellproc.child_env("cpu"), err.fileno())
        seen = json.loads(child.stdout.readline())
        assert child.wait(timeout=30) == 3
        # a variable read when OpenMP loads cannot change in a fork: that cell gets a fresh process instead
        assert server.start("test_cellproc:child_state", [0], {**env, "OMP_NUM_THREADS": "1"}, err.fileno()) is None
    assert seen == {"threads": fresh_threads(env), "omp": "PASSIVE", "marker": "after", "own_session": True,
                    "cuda_initialised": False, "cwd": os.getcwd()}
    assert log.read_text().strip() == "to the log"


def test_the_commit_is_asked_once_and_handed_to_every_cell(monkeypatch):
    # A `git` forked from a cell's process (torch loaded) briefly doubled the tree's RSS; the supervisor asks once.
    real, calls = subprocess.run, []
    monkeypatch.setattr(measure.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.delenv("BENCH_GIT_COMMIT", raising=False)
    measure.git_commit.cache_clear()
    try:
        commit = measure.git_commit()
        if commit is None:
            pytest.skip("not a git checkout")
        assert [cellproc.child_env("cpu")["BENCH_GIT_COMMIT"] for _ in range(3)] == [commit] * 3 and len(calls) == 1
        monkeypatch.setenv("BENCH_GIT_COMMIT", "given")  # what a cell's process finds: no git run there
        measure.git_commit.cache_clear()
        assert measure.git_commit() == "given" and len(calls) == 1
    finally:
        measure.git_commit.cache_clear()


@linux_only
def test_a_server_that_cannot_import_says_so_and_cells_start_fresh(tmp_path):
    env = cellproc.child_env("cpu")
    with forkserver.ForkServer(env, ["bench.no_such_module"]) as server, open(tmp_path / "log", "w") as err:
        with pytest.warns(UserWarning, match="fork server failed .*No module named 'bench.no_such_module'"):
            assert server.start("test_cellproc:child_state", [0], env, err.fileno()) is None


@linux_only
def test_cells_fork_from_the_server_or_start_fresh_and_rows_say_which(tmp_path, monkeypatch):
    suite = tiny_suite("start", [0, 1])
    forked = run_suite(suite, expand(suite), RunOptions(results=tmp_path)).rows
    monkeypatch.setenv("BENCH_START_METHOD", "subprocess")
    fresh = run_suite(suite, expand(suite), RunOptions(results=tmp_path, rerun=True, only="seed=1")).rows
    assert [r["start_method"] for r in forked] == ["forkserver", "forkserver"]
    assert [r["start_method"] for r in fresh] == ["subprocess"] and {r["status"] for r in forked + fresh} == {"ok"}
    # The server imports once, before the first cell is launched; a forked cell starts in well under a second.
    assert max(r["start_s"] for r in forked) < 1.0 < fresh[0]["start_s"], [r["start_s"] for r in forked + fresh]
    assert forked[1]["torch_threads"] == fresh[0]["torch_threads"]
    assert all(0 < r["peak_host_pss_bytes"] <= r["peak_host_rss_bytes"] for r in forked + fresh)
    monkeypatch.setenv("BENCH_START_METHOD", "vfork")
    with pytest.raises(BenchError, match="use forkserver or subprocess"):
        forkserver.wanted()


@pytest.mark.gpu
@linux_only
def test_a_forked_cell_gets_its_own_cuda_context(tmp_path):
    # The server never initialises CUDA, so a child forked from it can; its row is a GPU row like any other.
    # ResNet-18 without cuDNN autotuning: MobileNet's depthwise convolutions autotune for tens of seconds on an
    # H200 (EfficientNet-B0's first 20 steps took 32-39 s there); the MobileNet version of this test ran past the GPU
    # check's 50 s for pytest there, most likely for that reason (it printed nothing more).
    suite = parse_suite({"name": "gpu-fork", "dataset": "synthetic",
                         "defaults": {**TINY, "seeds": [0, 1], "cudnn_benchmark": False}, "grid": {"model": ["tv:resnet18"]}})
    rows = run_suite(suite, expand(suite), RunOptions(results=tmp_path, devices=("cuda:0",))).rows
    assert [(r["status"], r["start_method"], r["device"]) for r in rows] == [("ok", "forkserver", "cuda:0")] * 2, rows
    assert all(r["peak_vram_allocated_bytes"] > 0 and r["gpu_name"] and r["cudnn_benchmark"] is False for r in rows)


@linux_only
def test_a_forked_cell_dies_with_a_runner_killed_with_sigkill(tmp_path):
    (tmp_path / "s.yaml").write_text(json.dumps({"name": "orphan", "dataset": "synthetic",
                                                 "defaults": {**TINY, "seeds": [0]},
                                                 "grid": {"model": ["mobilenet_v3_small"]}}))
    cell = expand(parse_suite(json.loads((tmp_path / "s.yaml").read_text())))[0]
    env = {**os.environ, "BENCH_FAULTS": json.dumps({cell.id: "sleep:120"})}
    runner = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", "s.yaml", "--results", "res"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, family = time.time() + 120, []
    while time.time() < deadline and not any(_is_cell(p) for p in family):
        time.sleep(0.5)
        family = psutil.Process(runner.pid).children(recursive=True)
    assert any(_is_cell(p) for p in family), "no cell process appeared"
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]


def _is_cell(proc: psutil.Process) -> bool:
    """A child of the fork server: the cell's process."""
    try:
        return "bench.forkserver" in " ".join(proc.parent().cmdline())
    except (psutil.NoSuchProcess, AttributeError):
        return False


PSS_SCRIPT = """
import os, sys, time
import numpy as np
shared = np.ones({size}, dtype=np.uint8)  # touched: resident, then shared copy-on-write with the child
pid = os.fork()
if pid == 0:
    time.sleep(5)
    os._exit(0)
print("forked", flush=True)
os.waitpid(pid, 0)
"""


def test_pss_counts_the_pages_a_forked_child_shares_once(capsys):
    size = 400 * 2**20
    proc = subprocess.Popen([sys.executable, "-c", PSS_SCRIPT.format(size=size)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "forked"
    time.sleep(0.5)
    tree = psutil.Process(proc.pid)
    rss = measure.tree_rss_bytes(tree)
    t0 = time.perf_counter()
    pss = measure.tree_pss_bytes(tree)
    sample_ms = (time.perf_counter() - t0) * 1e3
    proc.wait()
    # RSS counts the array in both processes; PSS half in each, so once in the tree.
    assert abs((rss - pss) - size) < 0.1 * size, (rss, pss)
    assert pss > size
    with capsys.disabled():
        print(f"\ntree of two processes sharing {size / 2**20:.0f} MiB: RSS {rss / 2**20:.0f} MiB, "
              f"PSS {pss / 2**20:.0f} MiB, one PSS sample {sample_ms:.1f} ms")


def test_a_sampler_reads_pss_only_when_rss_says_it_may_matter(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "tree_pss_bytes", lambda proc: calls.append(1) or 100)
    memory = cellproc._HostMemory(os.getpid(), limit=None, on_over=lambda: None)
    for rss in (1000, 1005, 1000, 2000):  # a new high by 1 %, or 0.5 s since the last read
        memory._on_rss(rss)
    assert len(calls) == 2 and memory.pss_peak == 100
    stopped = []
    limited = cellproc._HostMemory(os.getpid(), limit=150, on_over=lambda: stopped.append(1))
    limited._pss_at = time.monotonic()
    limited._rss_high = 10**9
    limited._on_rss(120)  # RSS under the limit: PSS, never above RSS, is too
    limited._on_rss(200)  # RSS over it: PSS (100) decides, and it is under
    assert len(calls) == 3 and not stopped
