"""A fork server that dies is the harness failing, not the cell: the cell it ran gets no row (it runs again next
time), one warning line says so, and the next cell starts from a new server."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from bench import cellproc, forkserver
from bench.runner import RunOptions, run_suite, select
from bench.store import ResultStore
from bench.suite import expand, parse_suite

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux's (PDEATHSIG)")

TINY = {"steps": 2, "batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False,
        "resolution": 32, "epochs": 1, "infer_bench": "off"}
DIED = "warning: the fork server died"


def nap(seconds: float) -> int:
    """A fork server target: a cell that takes `seconds`."""
    time.sleep(seconds)
    return 7


def server_of(child: forkserver.Forked) -> int:
    return psutil.Process(child.pid).ppid()


def test_a_dead_server_is_not_the_cells_failure_and_the_next_cell_gets_a_new_one(tmp_path, capsys):
    env = cellproc.child_env("cpu")
    with forkserver.ForkServer(env, []) as server, open(tmp_path / "log", "w") as err:
        child = server.start("test_forkserver_death:nap", [60], env, err.fileno())
        first, cell = server_of(child), psutil.Process(child.pid)
        os.kill(first, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL and child.server_lost
        assert not psutil.wait_procs([cell], timeout=10)[1]  # the cell died with its server
        # Asked from a thread that ends at once, as a device's thread does when no cells are left for it: the new
        # server outlives that thread (PDEATHSIG follows the thread that started a process).
        started: list = []
        asker = threading.Thread(target=lambda: started.append(server.start("test_forkserver_death:nap", [1.5], env,
                                                                             err.fileno())))
        asker.start()
        asker.join()
        again = started[0]
        assert again is not None and server_of(again) != first
        assert again.wait(timeout=30) == 7 and not again.server_lost
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(said) == 1 and said[0].startswith(DIED) and "killed by SIGKILL" in said[0], said


def test_a_server_found_dead_between_cells_is_replaced_and_one_that_keeps_dying_is_given_up(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.setattr(forkserver, "MAX_DEATHS", 2)
    env = cellproc.child_env("cpu")
    with forkserver.ForkServer(env, []) as server, open(tmp_path / "log", "w") as err:
        assert server.wait_ready()
        _kill(server)  # while no cell runs: the next cell's request finds it dead
        child = server.start("test_forkserver_death:nap", [0], env, err.fileno())
        assert child is not None and child.wait(timeout=30) == 7
        _kill(server)
        with pytest.warns(UserWarning, match="fork server failed .*it died 2 times.*start as fresh processes"):
            assert server.start("test_forkserver_death:nap", [0], env, err.fileno()) is None
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(said) == 2 and all(ln.startswith(DIED) for ln in said), said
    assert said[0].endswith("start from a new server") and not said[1].endswith("start from a new server"), said


def _kill(server: forkserver.ForkServer) -> None:
    os.kill(server._server.proc.pid, signal.SIGKILL)
    server._server.proc.wait()


def test_a_cell_whose_server_is_killed_gets_no_row_and_runs_again(tmp_path, monkeypatch, capsys):
    suite = parse_suite({"name": "server-dies", "dataset": "synthetic", "defaults": {**TINY, "seeds": [0, 1]},
                         "grid": {"model": ["tv:mobilenet_v3_small"]}})
    cells = expand(suite)
    monkeypatch.setenv("BENCH_FAULTS", json.dumps({cells[0].id: "sleep:120"}))
    killed: list[int] = []
    watcher = threading.Thread(target=lambda: killed.extend(_kill_the_server_under_a_cell(timeout_s=180)), daemon=True)
    watcher.start()
    summary = run_suite(suite, cells, RunOptions(results=tmp_path))
    watcher.join()
    assert killed, "no cell process appeared"
    # The first cell has no row (not `killed`: resume would skip it); the second ran from a new server.
    assert [(r["cell_id"], r["status"], r["start_method"]) for r in summary.rows] == [(cells[1].id, "ok", "forkserver")]
    store = ResultStore(tmp_path)
    assert store.done_cell_ids(suite.name) == {cells[1].id}
    assert select(cells, store, suite.name, RunOptions(results=tmp_path)) == ([cells[0]], 1)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(said) == 1 and said[0].startswith(DIED) and "run again" in said[0], said


def _kill_the_server_under_a_cell(timeout_s: float) -> list[int]:
    """SIGKILL the fork server once a cell runs from it; the server's pid, or [] if no cell appeared."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.Process().children(recursive=True):
            try:
                parent = proc.parent()
                if parent is not None and "bench.forkserver" in " ".join(parent.cmdline()):
                    parent.kill()
                    return [parent.pid]
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    return []
