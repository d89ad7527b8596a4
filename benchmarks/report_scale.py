"""`bench report` on a long history: N synthetic cell files (nights of suites/cifar_full.yaml), timed.

    python -m benchmarks.report_scale --cells 20000                 # loose cell files, as `bench run` leaves them
    python -m benchmarks.report_scale --cells 20000 --compact       # after `bench compact`

Each night is one run of the 204 cells of suites/cifar_full.yaml with full rows (per-class metrics, a 10x10
confusion matrix, the 1.7 kB `test_correct` of 10,000 test images) and a 5-epoch table, written with pyarrow
in bench's own schema (`bench.store.CELL_SCHEMA`). The report shows the latest night and compares it with the
night before. Times are wall clock for the whole `bench report` process (imports, plots and HTML included);
peak RSS is the kernel's `ru_maxrss` of that process.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import table

SUITE = Path(__file__).resolve().parents[1] / "suites" / "cifar_full.yaml"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
T0 = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)


def suite_cells() -> list:
    from bench.suite import load_suite
    from bench.validate import resolve_cells

    return resolve_cells(load_suite(SUITE))


def static_fields(cells: list) -> list[dict]:
    """Each cell's configuration columns, computed once for every night."""
    return [{**c.model_dump(exclude={"freeze"}), "freeze": c.freeze_label, "cell_id": c.id, "group_id": c.group_id,
             "cell_json": c.canonical()} for c in cells]


def night_table(cells: list[dict], night: int, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """One night's rows (one per cell) and epoch rows, in bench's schemas."""
    from bench.store import CELL_SCHEMA, EPOCH_SCHEMA

    start = T0 + dt.timedelta(days=night)
    run_id = start.strftime("%Y%m%dT%H%M%SZ") + f"-{night:06x}"
    rows, epochs = [], []
    for i, cell in enumerate(cells):
        when = start + dt.timedelta(seconds=60 * i)
        top1 = float(np.clip(0.6 + 0.3 * rng.random(), 0, 1))
        correct = rng.random(10_000) < top1
        row = {
            **cell, "run_id": run_id, "suite": "cifar_full", "suite_hash": "0123abcd", "status": "ok", "lr": 0.01, "precision": "bf16", "num_classes": 10, "train_images": 45_000,
            "val_images": 5_000, "test_images": 10_000, "loader": "resident", "stored_resolution": 32,
            "input_mean": [0.485, 0.456, 0.406], "input_std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
            "crop_pct": 0.875, "feature_cache_used": False, "trainable_params": 11_000_000,
            "total_params": 11_700_000, "frozen_layers": 0, "total_layers": 60, "flops_per_image": 1_800_000_000,
            "top1": top1, "top5": min(1.0, top1 + 0.08), "val_top1_best": top1, "val_top1_final": top1,
            "train_loss_final": 0.4, "val_loss_final": 0.5, "epochs_run": 5, "steps_run": 1760,
            "target_reached": False, "test_epoch": 4, "class_names": CLASSES,
            "per_class_top1": rng.random(10).tolist(), "per_class_precision": rng.random(10).tolist(),
            "per_class_recall": rng.random(10).tolist(),
            "confusion_matrix": rng.integers(0, 1000, (10, 10)).tolist(),
            "test_correct": base64.b64encode(np.packbits(correct).tobytes()).decode(),
            "wall_s": 300.0, "setup_s": 20.0, "train_s": 250.0, "eval_s": 20.0, "warmup_s": 2.0, "warmup_steps": 5,
            "images_per_s": 2000 + 100 * rng.random(), "peak_vram_allocated_bytes": int(8e9),
            "peak_vram_reserved_bytes": int(9e9), "peak_host_rss_bytes": int(4e9), "data_device_bytes": 150_000_000,
            "infer_images_per_s": 8000.0, "infer_latency_ms_p50": 3.0, "infer_latency_ms_p95": 3.5,
            "infer_latency_samples": 50, "model_bytes": 45_000_000, "device": "cuda:0",
            "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "driver_version": "560.35", "cuda_version": "12.6",
            "torch_version": "2.15.0", "torchvision_version": "0.29.2", "python_version": "3.12.3",
            "hostname": "gpu-runner-1", "bench_version": "0.1.0", "git_commit": "abc1234",
            "started_at": when, "finished_at": when + dt.timedelta(seconds=55),
        }
        rows.append({k: v for k, v in row.items() if k in CELL_SCHEMA.names})
        epochs += [{"run_id": run_id, "suite": "cifar_full", "cell_id": cell["cell_id"], "epoch": e, "step": 352 * (e + 1),
                    "lr": 0.01, "train_loss": 1.0 / (e + 1), "train_top1": 0.5 + 0.08 * e, "val_loss": 1.1 / (e + 1),
                    "val_top1": 0.5 + 0.07 * e, "epoch_s": 50.0, "images_per_s": 2000.0} for e in range(5)]
    return pa.Table.from_pylist(rows, schema=CELL_SCHEMA), pa.Table.from_pylist(epochs, schema=EPOCH_SCHEMA)


def generate(folder: Path, n_cells: int, seed: int = 0) -> int:
    """Write n_cells cell files (and their epoch files) as consecutive nights; returns the number of nights."""
    cells, rng = static_fields(suite_cells()), np.random.default_rng(seed)
    base = folder / "cifar_full"
    (base / "cells").mkdir(parents=True, exist_ok=True)
    (base / "epochs").mkdir(parents=True, exist_ok=True)
    written, night = 0, 0
    while written < n_cells:
        rows, epochs = night_table(cells, night, rng)
        for i in range(min(rows.num_rows, n_cells - written)):
            name = f"{rows['cell_id'][i].as_py()}--{rows['run_id'][i].as_py()}.parquet"
            pq.write_table(rows.slice(i, 1), base / "cells" / name)
            pq.write_table(epochs.slice(5 * i, 5), base / "epochs" / name)
            written += 1
        night += 1
    return night


def timed(args: list[str], python_path: Path | None = None) -> dict:
    """Run a command; its wall time and the kernel's peak RSS for it (ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if python_path:  # another checkout of bench first on the path: how the "before" figures were taken
        env["PYTHONPATH"] = str(python_path)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=python_path)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: a regression was flagged, which the synthetic data may well contain
        sys.exit(f"{' '.join(args)} failed with {code}:\n{output}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "output": output.strip().splitlines()[-1:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000, help="cell files to generate (default 20000)")
    parser.add_argument("--folder", type=Path, help="results folder to use (kept; default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="time an already generated --folder as it is")
    parser.add_argument("--compact", action="store_true", help="run `bench compact` before timing the report")
    parser.add_argument("--repeat", type=int, default=2, help="time the report this many times (default 2)")
    parser.add_argument("--python-path", type=Path, help="time the bench found in this checkout (e.g. a worktree of "
                        "an older commit) instead of the installed one")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    args = parser.parse_args()
    bench = [sys.executable, "-m", "bench.cli"]
    read = [sys.executable, "-c", "import sys; from bench.store import ResultStore; r = ResultStore(sys.argv[1]).read(); "
            "print(f'read {len(r.cells)} rows, {len(r.epochs)} epoch rows')"]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-report-scale-"))
    try:
        if not args.reuse:
            t0 = time.perf_counter()
            nights = generate(folder, args.cells)
            print(f"generated {args.cells} cell files ({nights} nights) in {folder} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        figures: dict = {"cells": args.cells}
        if args.compact:
            figures["compact"] = timed([*bench, "compact", "--results", str(folder)], args.python_path)
            print(f"bench compact: {figures['compact']['wall_s']:.1f} s, {figures['compact']['output']}", flush=True)
        files = sum(1 for _ in (folder / "cifar_full" / "cells").glob("*.parquet"))
        rows = []
        with tempfile.TemporaryDirectory() as out:
            for i in range(args.repeat):
                result = timed([*bench, "report", "--results", str(folder), "--out", out], args.python_path)
                alone = timed([*read, str(folder)], args.python_path)
                rows.append({"try": i + 1, "cell_files": files, "report_s": result["wall_s"],
                             "report_peak_rss_mib": result["peak_rss_mib"], "read_only_s": alone["wall_s"],
                             "read_peak_rss_mib": alone["peak_rss_mib"]})
                print(f"bench report: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB; "
                      f"{result['output']}; ResultStore.read() alone: {alone['wall_s']:.1f} s, "
                      f"{alone['peak_rss_mib']:.0f} MiB, {alone['output']}", flush=True)
        print(table(rows, ["try", "cell_files", "report_s", "report_peak_rss_mib", "read_only_s", "read_peak_rss_mib"]))
        if args.json:
            print(json.dumps({**figures, "report": rows}, default=str))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
