"""The Ray executor on a real two-node Ray cluster on this machine: `ray start --head`, then `ray start --address`
with its own resources and temp folder, and `bench run --ray ADDRESS` as a user runs it. Everything lives in a
network namespace of its own, where the only address is 127.0.0.1 (Ray otherwise picks this machine's outward
address), with token authentication on, as `ray start` has it by default.

Cells land on both nodes; a worker node killed mid-cell is a killed row and the next run resumes the cell; a driver
killed mid-run resumes exactly once; a node with another bench is one error line before any cell runs. About two
and a half minutes on two cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.store import ResultStore

pytest.importorskip("ray", reason="the Ray executor needs `pip install 'bench[ray]'`")
pytestmark = [pytest.mark.raycluster, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).with_name("ray"))
BENCH = str(Path(sys.executable).with_name("bench"))
PORT = 6399
ADDRESS = f"127.0.0.1:{PORT}"
TINY = {"batch_size": 16, "train_subset": 64, "test_subset": 32, "pretrained": False, "resolution": 32, "epochs": 1,
        "infer_bench": "off"}


class Cluster:
    """Ray nodes in a network namespace held open by one `sleep`; every process in it is ours to kill."""

    def __init__(self, root: Path):
        self.root = root
        self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 3600"])
        token = root / "token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "OMP_WAIT_POLICY": "PASSIVE",
                    # a lost node is noticed in seconds, not the default half minute
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.env.pop("RAY_ADDRESS", None)
        deadline = time.monotonic() + 10
        while "UP" not in self.inside(["ip", "-br", "link", "show", "lo"]).stdout and time.monotonic() < deadline:
            time.sleep(0.1)

    def inside(self, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-n", *argv], env=env or self.env,
                              capture_output=True, text=True, timeout=kwargs.pop("timeout", 240), **kwargs)

    def start_node(self, name: str, env: dict | None = None) -> None:
        head = ["--head", f"--port={PORT}", "--include-dashboard=false"]
        where = head if name == "head" else [f"--address={ADDRESS}"]
        done = self.inside([RAY, "start", *where, "--num-cpus=1", f"--resources={json.dumps({f'bench_{name}': 1})}",
                            f"--temp-dir={self.root / name}", "--disable-usage-stats"], env=env)
        assert done.returncode == 0, done.stdout + done.stderr

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node (its raylet, agents, workers: their command lines name its temp dir)."""
        for pid in self._pids():
            try:
                if str(self.root / name) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                continue

    def _pids(self) -> list[int]:
        """Every process in the namespace but its holder."""
        ours = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        out = []
        for entry in Path("/proc").iterdir():
            try:
                mine = entry.name.isdigit() and int(entry.name) != self.holder.pid
                if mine and os.readlink(entry / "ns/net") == ours:
                    out.append(int(entry.name))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
        return out

    def close(self) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self.holder.kill()
        self.holder.wait()

    def bench(self, suite: Path, results: Path, *more: str, env: dict | None = None) -> subprocess.CompletedProcess:
        # From the suite's folder: Ray puts the driver's working directory on its workers' sys.path, and from this
        # checkout every node would import the checkout's bench whatever it has installed.
        return self.inside([BENCH, "run", str(suite), "--ray", ADDRESS, "--results", str(results), *more], env=env,
                           cwd=suite.parent)

    def bench_started(self, suite: Path, results: Path) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-n", BENCH, "run", str(suite), "--ray",
                                 ADDRESS, "--results", str(results)], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=suite.parent)


@pytest.fixture(scope="module")
def cluster():
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"a Ray cluster on loopback needs a network namespace: root and {', '.join(missing) or 'unshare'}")
    root = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    made = Cluster(root)
    try:
        made.start_node("head")
        made.start_node("b")
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


def write_suite(folder: Path, name: str, defaults: dict, seeds: list[int]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "dataset": "synthetic", "defaults": {**defaults, "seeds": seeds},
                                "grid": {"model": ["tv:mobilenet_v3_small"]}}))
    return path


def rows_of(results: Path):
    return ResultStore(results).read().cells


def test_cells_land_on_both_nodes_and_their_rows_and_logs_come_back(cluster, tmp_path):
    suite = write_suite(tmp_path, "two", {**TINY, "epochs": 3}, [0, 1])
    done = cluster.bench(suite, tmp_path / "r")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = rows_of(tmp_path / "r")
    assert list(rows["status"]) == ["ok", "ok"]
    nodes = sorted(rows["hostname"])
    assert len(set(nodes)) == 2 and all("(ray node " in h for h in nodes), nodes  # one cell on each node
    logs = sorted((tmp_path / "r" / "two" / "logs").glob("*.log"))
    assert len(logs) == 2 and {log.read_text().split()[2][:8] for log in logs} == {h[-9:-1] for h in nodes}


def test_a_cluster_that_asks_for_a_token_says_how_to_give_it(cluster, tmp_path):
    suite = write_suite(tmp_path, "token", TINY, [0])
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    done = cluster.bench(suite, tmp_path / "r", env=env)
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 2 and len(said) == 1, done.stderr
    assert "cannot connect to a Ray cluster" in said[0] and "set RAY_AUTH_MODE=token" in said[0]
    assert not (tmp_path / "r").exists()


def test_a_node_with_another_bench_or_none_is_one_error_line_before_any_cell_runs(cluster, tmp_path):
    fake = tmp_path / "other" / "bench"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.0+other"\n')
    suite = write_suite(tmp_path, "versions", TINY, [0, 1, 2])
    cluster.start_node("c", env={**cluster.env, "PYTHONPATH": str(fake.parent)})  # its workers import this bench
    try:
        done = cluster.bench(suite, tmp_path / "r")
        said = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert done.returncode == 2 and len(said) == 1, done.stderr
        assert "1 of the cluster's 3 nodes cannot run bench 0.1.0" in said[0] and ": 0.0.0+other;" in said[0]
        assert rows_of(tmp_path / "r").empty  # before any cell ran
        (fake / "__init__.py").write_text('raise ImportError("No module named \'bench\'")\n')  # a node without it
        done = cluster.bench(suite, tmp_path / "r")
        said = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        assert done.returncode == 2 and len(said) == 1 and "no bench (No module named 'bench')" in said[0], done.stderr
        assert rows_of(tmp_path / "r").empty
    finally:
        cluster.kill_node("c")
    deadline = time.monotonic() + 60  # the head notices node c gone within seconds (the health checks above)
    while time.monotonic() < deadline and "bench_c" in cluster.inside(
            [RAY, "status", f"--address={ADDRESS}"]).stdout:
        time.sleep(1)


def test_the_driver_killed_mid_run_resumes_exactly_once(cluster, tmp_path):
    suite = write_suite(tmp_path, "driver", TINY, [0, 1, 2, 3])
    results = tmp_path / "r"
    driver = cluster.bench_started(suite, results)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and len(list((results / "driver" / "cells").glob("*.parquet"))) < 1:
        time.sleep(0.2)
    driver.kill()  # SIGKILL: no clean-up of its own; Ray ends its tasks with its job
    out = driver.communicate()[0]
    before = rows_of(results)
    assert 1 <= len(before) < 4, out
    done = cluster.bench(suite, results)
    assert done.returncode == 0, done.stdout + done.stderr
    after = rows_of(results)
    assert sorted(after["cell_id"]) == sorted(set(after["cell_id"])) and len(after) == 4  # one row a cell
    assert set(before["run_id"]) < set(after["run_id"]) and f"{len(before)} already done" in done.stdout


def test_a_worker_node_killed_mid_cell_is_a_killed_row_and_the_next_run_resumes_it(cluster, tmp_path):
    suite = write_suite(tmp_path, "nodekill", {**TINY, "train_subset": 256, "epochs": 12, "checkpoint": "epoch"},
                        [0, 1])
    results = tmp_path / "r"
    driver = cluster.bench_started(suite, results)
    store = ResultStore(results)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        saved = [store.saved_state("nodekill", p.name) for p in (results / "nodekill" / "state").glob("*")]
        if len(saved) == 2 and all(meta and meta["epochs_done"] >= 1 for meta in saved):
            break  # both cells are past their first saved epoch, one on each node
        time.sleep(0.2)
    cluster.kill_node("b")
    out = driver.communicate(timeout=200)[0]
    assert driver.returncode == 0, out  # the run went on
    rows = rows_of(results).set_index("cell_id")
    assert sorted(rows["status"]) == ["killed", "ok"], out
    killed = rows[rows["status"] == "killed"].index[0]
    assert rows.loc[killed, "error"].startswith("the Ray task ended without a result")
    assert store.saved_state("nodekill", killed)["epochs_done"] >= 1
    done = cluster.bench(suite, results)  # the head alone now: a killed cell with a saved state resumes
    assert done.returncode == 0, done.stdout + done.stderr
    latest = rows_of(results).sort_values("finished_at").groupby("cell_id").tail(1).set_index("cell_id")
    assert latest.loc[killed, "status"] == "ok" and latest.loc[killed, "resumed_from_epoch"] >= 1
    assert latest.loc[killed, "segments"] == 2
