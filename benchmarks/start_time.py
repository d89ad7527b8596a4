"""How long a cell takes to start: the smoke suite through the real runner, once with every cell a fresh
interpreter (`BENCH_START_METHOD=subprocess`, how every cell started before the fork server) and once forked from
the fork server, alternating when repeated.

    python -m benchmarks.start_time [--repeats 1]

`start_s` runs from the runner launching a cell to its worker having its libraries imported and being ready to
load data. The fork server's own imports happen once per run, before the first cell is launched: they are in
`first_cell_after_s` (from the run's start to its first cell's launch) and in the suite's wall time, not in
any cell's `start_s`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.runner import RunOptions, run_suite
from bench.suite import load_suite
from bench.validate import resolve_cells
from benchmarks.common import table

SMOKE = Path(__file__).resolve().parent.parent / "suites" / "smoke.yaml"
METHODS = ("subprocess", "forkserver")


def run_smoke(method: str) -> tuple[list[dict], float, float]:
    """The smoke suite's rows with every cell started by `method`, the run's wall time, and the time from the
    run's start to its first cell's launch."""
    suite = load_suite(SMOKE)
    os.environ["BENCH_START_METHOD"] = method
    with tempfile.TemporaryDirectory() as tmp:
        began, t0 = datetime.now(timezone.utc), time.perf_counter()
        rows = run_suite(suite, resolve_cells(suite), RunOptions(results=Path(tmp))).rows
        wall = time.perf_counter() - t0
    return rows, wall, (min(r["started_at"] for r in rows) - began).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per start method, alternating")
    args = parser.parse_args()
    rows, walls, firsts = [], {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS if repeat % 2 == 0 else reversed(METHODS):
            ran, wall, first = run_smoke(method)
            walls[method].append(wall)
            firsts[method].append(first)
            rows += [{"run": repeat, "asked": method, "start_method": r["start_method"], "cell": r["cell_id"],
                      "model": r["model"], "resolution": r["resolution"], "status": r["status"],
                      "start_s": r["start_s"], "setup_s": r["setup_s"], "wall_s": r["wall_s"], "first": i == 0}
                     for i, r in enumerate(ran)]
    print(f"\nstart_s per cell, smoke suite ({len(rows) // (2 * args.repeats)} cells), {os.cpu_count()} CPUs\n")
    print(table(rows, ["run", "asked", "start_method", "cell", "model", "resolution", "status", "start_s", "setup_s",
                       "wall_s"]))
    print()
    summary = []
    for method in METHODS:
        mine = [r for r in rows if r["asked"] == method]
        summary.append({"start_method": method, "median_start_s": statistics.median(r["start_s"] for r in mine),
                        "median_start_s_after_first": statistics.median(r["start_s"] for r in mine if not r["first"]),
                        "first_cell_start_s": statistics.median(r["start_s"] for r in mine if r["first"]),
                        "first_cell_after_s": statistics.median(firsts[method]),
                        "suite_wall_s": statistics.median(walls[method])})
    print(table(summary, ["start_method", "median_start_s", "median_start_s_after_first", "first_cell_start_s",
                          "first_cell_after_s", "suite_wall_s"]))


if __name__ == "__main__":
    main()
