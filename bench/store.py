"""Results on disk: the Parquet schema, atomic per-cell writes, and reading runs back as DataFrames.

Layout under the results folder (one file per cell and run, so nothing is ever rewritten):

    <results>/<suite>/cells/<cell_id>--<run_id>.parquet    one row: the cell's config, metrics, provenance
    <results>/<suite>/epochs/<cell_id>--<run_id>.parquet   one row per epoch (or throughput window)
    <results>/<suite>/logs/<cell_id>--<run_id>.log         the worker's stderr
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.errors import ResultsError

STATUSES = ("ok", "oom", "killed", "timeout", "error", "unavailable")

_f64, _i64, _str, _bool = pa.float64(), pa.int64(), pa.string(), pa.bool_()

# Column name -> type. Units are in the names (_s, _bytes, _per_s); accuracies are fractions in [0, 1].
CELL_COLUMNS: dict[str, pa.DataType] = {
    # identity
    "run_id": _str, "suite": _str, "suite_hash": _str, "cell_id": _str, "group_id": _str,
    "status": _str, "error": _str,
    # the cell's configuration, as resolved
    "dataset": _str, "model": _str, "resolution": _i64, "source_resolution": _i64, "batch_size": _i64, "freeze": _str,
    "epochs": _i64, "steps": _i64, "optimizer": _str, "lr": _f64, "momentum": _f64,
    "weight_decay": _f64, "schedule": _str, "warmup_fraction": _f64, "label_smoothing": _f64,
    "precision": _str, "channels_last": _bool, "compile": _bool, "pretrained": _bool, "weights": _str,
    "head": _str, "head_hidden": _i64, "head_dropout": _f64, "head_bn": _bool, "probe_norm": _str,
    "augment": _str, "val_fraction": _f64, "train_subset": _i64, "test_subset": _i64, "seed": _i64,
    "target_top1": _f64, "restore_best": _bool, "mode": _str, "throughput_warmup_steps": _i64,
    "throughput_steps": _i64,
    "feature_cache": _str, "infer_bench": _str, "infer_budget_s": _f64, "cell_timeout_s": _f64, "cell_json": _str,
    # data and model as built
    "num_classes": _i64, "train_images": _i64, "val_images": _i64, "test_images": _i64,
    "loader": _str, "stored_resolution": _i64, "input_mean": pa.list_(_f64), "input_std": pa.list_(_f64),
    "interpolation": _str, "crop_pct": _f64, "feature_cache_used": _bool, "trainable_params": _i64, "total_params": _i64,
    "frozen_layers": _i64, "total_layers": _i64, "flops_per_image": _i64,
    "model_source_file": _str, "model_source_sha256": _str, "weights_sha256": _str,  # py: models, weights files
    # accuracy
    "top1": _f64, "top5": _f64, "val_top1_best": _f64, "val_top1_final": _f64,
    "train_loss_final": _f64, "val_loss_final": _f64, "epochs_run": _i64, "steps_run": _i64,
    "target_reached": _bool, "time_to_target_s": _f64, "test_epoch": _i64,
    "class_names": pa.list_(_str), "per_class_top1": pa.list_(_f64),
    "per_class_precision": pa.list_(_f64), "per_class_recall": pa.list_(_f64),
    "confusion_matrix": pa.list_(pa.list_(_i64)), "test_correct": _str,
    # time
    "wall_s": _f64, "start_s": _f64, "start_method": _str, "setup_s": _f64, "compile_s": _f64,
    "train_s": _f64, "eval_s": _f64,
    "warmup_s": _f64, "warmup_steps": _i64, "images_per_s": _f64, "feature_extract_s": _f64,
    # memory
    "peak_vram_allocated_bytes": _i64, "peak_vram_reserved_bytes": _i64, "peak_vram_nvml_bytes": _i64,
    "peak_host_pss_bytes": _i64, "peak_host_rss_bytes": _i64, "peak_host_maxrss_bytes": _i64, "data_device_bytes": _i64,
    "peak_vram_train_bytes": _i64,
    # inference cost of the trained model
    "infer_images_per_s": _f64, "infer_latency_ms_p50": _f64, "infer_latency_ms_p95": _f64,
    "infer_latency_samples": _i64, "infer_peak_vram_bytes": _i64, "infer_s": _f64, "model_bytes": _i64,
    # provenance
    "device": _str, "gpu_name": _str, "gpu_count": _i64, "driver_version": _str, "cuda_version": _str,
    "cudnn_version": _str, "torch_version": _str, "torchvision_version": _str, "timm_version": _str,
    "python_version": _str, "torch_threads": _i64, "cudnn_benchmark": _bool, "cpu_model": _str, "hostname": _str,
    "bench_version": _str,
    "git_commit": _str, "started_at": pa.timestamp("us", tz="UTC"), "finished_at": pa.timestamp("us", tz="UTC"),
}
CELL_SCHEMA = pa.schema(list(CELL_COLUMNS.items()))

EPOCH_COLUMNS: dict[str, pa.DataType] = {
    "run_id": _str, "suite": _str, "cell_id": _str, "epoch": _i64, "step": _i64, "lr": _f64,
    "train_loss": _f64, "train_top1": _f64, "val_loss": _f64, "val_top1": _f64,
    "epoch_s": _f64, "images_per_s": _f64,
}
EPOCH_SCHEMA = pa.schema(list(EPOCH_COLUMNS.items()))

REQUIRED = ("run_id", "suite", "cell_id", "status", "model")


@dataclass
class Results:
    """Everything read back from a results folder; `problems` names files that were skipped."""

    cells: pd.DataFrame
    epochs: pd.DataFrame
    problems: list[str] = field(default_factory=list)


class ResultStore:
    """One results folder. Writes are atomic per cell; reads never fail on one bad file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _file(self, kind: str, suite: str, cell_id: str, run_id: str, ext: str = "parquet") -> Path:
        return self.root / suite / kind / f"{cell_id}--{run_id}.{ext}"

    def log_path(self, suite: str, cell_id: str, run_id: str) -> Path:
        path = self._file("logs", suite, cell_id, run_id, "log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def done_cell_ids(self, suite: str) -> set[str]:
        """Cell ids that already have a row. An `unavailable` row does not count: its fix (a download)
        lies outside the cell, so the next run tries the cell again. Unreadable files do not count either."""
        done = set()
        for path in _parquet_files(self.root / suite / "cells"):
            try:
                status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
            except (OSError, KeyError, pa.ArrowException):
                continue
            if status and status[0] != "unavailable":
                done.add(path.name.split("--")[0])
        return done

    def write(self, row: dict, epochs: list[dict]) -> Path:
        """Write one cell's row and its epoch table; the row is renamed into place last (it marks 'done')."""
        unknown = set(row) - set(CELL_COLUMNS)
        if unknown:
            raise ValueError(f"columns not in the results schema: {sorted(unknown)}")
        suite, cell_id, run_id = row["suite"], row["cell_id"], row["run_id"]
        epoch_rows = [{"run_id": run_id, "suite": suite, "cell_id": cell_id, **e} for e in epochs]
        _atomic_parquet(pa.Table.from_pylist(epoch_rows, schema=EPOCH_SCHEMA), self._file("epochs", suite, cell_id, run_id))
        target = self._file("cells", suite, cell_id, run_id)
        _atomic_parquet(pa.Table.from_pylist([row], schema=CELL_SCHEMA), target)
        return target

    def read(self) -> Results:
        problems: list[str] = []
        suites = sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        cells = _read_all([f for s in suites for f in _parquet_files(s / "cells")], REQUIRED, problems)
        epochs = _read_all([f for s in suites for f in _parquet_files(s / "epochs")], ("run_id", "cell_id", "epoch"), problems)
        return Results(cells=cells, epochs=epochs, problems=problems)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one `bench run`; a second run on it is refused, not interleaved."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ResultsError(
                f"another bench run is writing to {self.root}; wait for it to finish or pass a different --results folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _parquet_files(folder: Path) -> list[Path]:
    """Finished files only: a write interrupted by a kill leaves a hidden .tmp- file, never a row."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def _atomic_parquet(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_all(paths: list[Path], required: tuple[str, ...], problems: list[str]) -> pd.DataFrame:
    frames = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{path}: not a readable Parquet file ({exc.__class__.__name__}); delete or move it")
            continue
        missing = [c for c in required if c not in table.column_names]
        if missing:
            problems.append(f"{path}: not a bench results file (no {', '.join(missing)} column); move it out of the results folder")
            continue
        frames.append(table.to_pandas())
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
