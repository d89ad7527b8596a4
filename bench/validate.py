"""Check a suite's cells against the registries before anything runs: models exist, each model
takes each resolution, the dataset is known. Kept apart from suite.py so the schema stays torch-free.

Also what the suite will cost: each cell's run time on a device from its FLOPs, image counts and epochs, with
a per-device speed fitted to earlier rows of that device (built-in rough figures where there are none), and the
cells likely to run out of memory, judged from earlier rows of the same model."""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError, ResolutionError, SuiteError, close_matches
from bench.suite import Cell, Suite, expand


def resolve_cells(suite: Suite) -> list[Cell]:
    """Expand a suite with the model registry and reject any cell that cannot run as written."""
    from bench import data, models

    try:
        data.parse_name(suite.dataset)
        cells = expand(suite, resolve_model=models.resolve)
    except SuiteError:
        raise
    except BenchError as exc:
        raise SuiteError(f"{suite.source}: {exc}") from None
    checked: set[tuple[str, int, str | None]] = set()
    for cell in cells:
        key = (cell.model, cell.resolution, cell.weights)
        if key in checked:
            continue
        try:
            models.check_resolution(cell.model, cell.resolution, weights=cell.weights)
        except ResolutionError as exc:
            raise SuiteError(f"{suite.source}: cell {cell.id}: {exc}; drop it with an exclude entry "
                             f"such as {{model: {cell.model.split(':', 1)[-1]}, resolution: {cell.resolution}}}") from None
        except BenchError as exc:  # a weights file that does not fit, say: its own message names the fix
            raise SuiteError(f"{suite.source}: cell {cell.id}: {exc}") from None
        checked.add(key)
    return cells


# --- estimates: what a suite will cost, before anyone commits a night to it ------------------------------------


@dataclass(frozen=True)
class DeviceSpeed:
    """A device class's speed: built-in figures until earlier rows of the device calibrate them.

    `flops_per_s` is the effective training rate in forward FLOPs: images/s x 3 x forward FLOPs of a
    ResNet-50-like net in bf16 (fp32 on a CPU). The GPU figures are rough, guessed from public numbers:
    NVIDIA's and MLPerf's ResNet-50 mixed-precision training rates (V100 about 1,300 img/s, A100 about 2,500,
    H100 about 4,000, at 24.6 GFLOP per trained image), cut by a third for eager PyTorch, and scaled by
    datasheet ratios for the others. Expect a factor of 2-3 either way, more for depthwise nets (MobileNet,
    EfficientNet), which reach a far smaller share of a GPU's FLOPs, until rows of the model calibrate it.
    """

    flops_per_s: float
    step_s: float  # fixed cost of one optimizer step or evaluation batch: kernel launches, Python, the loader
    setup_s: float  # per cell: process start, data to the device, model and weights, the inference timing
    memory_bytes: int


GIB = 2**30
DEVICES: dict[str, DeviceSpeed] = {
    "cpu": DeviceSpeed(10e9, 0.3, 12.0, 0),  # per core; memory: this machine's RAM (psutil)
    "h200": DeviceSpeed(70e12, 0.006, 25.0, 141 * GIB),
    "h100": DeviceSpeed(65e12, 0.006, 25.0, 80 * GIB),
    "a100": DeviceSpeed(40e12, 0.006, 25.0, 80 * GIB),  # the 40 GB A100 exists too: --gpu a100 assumes 80
    "l40s": DeviceSpeed(40e12, 0.006, 25.0, 48 * GIB),
    "rtx4090": DeviceSpeed(35e12, 0.006, 25.0, 24 * GIB),
    "rtx3090": DeviceSpeed(20e12, 0.006, 25.0, 24 * GIB),
    "v100": DeviceSpeed(20e12, 0.008, 25.0, 32 * GIB),
    "a10g": DeviceSpeed(15e12, 0.008, 25.0, 24 * GIB),
    "a10": DeviceSpeed(15e12, 0.008, 25.0, 24 * GIB),
    "l4": DeviceSpeed(12e12, 0.008, 25.0, 24 * GIB),
    "t4": DeviceSpeed(6e12, 0.010, 25.0, 16 * GIB),
}
# Image counts (train, own validation split or None, test, classes) of the datasets whose size is fixed.
DATASET_SIZES = {"cifar10": (50_000, None, 10_000, 10), "cifar100": (50_000, None, 10_000, 100),
                 "cinic10": (90_000, 90_000, 90_000, 10)}
ROW_COLUMNS = ["model", "resolution", "batch_size", "freeze", "precision", "mode", "augment", "feature_cache_used",
               "device", "gpu_name", "cpu_model", "wall_s", "train_s", "eval_s", "steps_run", "epochs_run",
               "train_images", "val_images", "test_images", "flops_per_image", "total_params",
               "peak_vram_allocated_bytes", "peak_vram_process_bytes", "peak_host_pss_bytes", "peak_host_rss_bytes",
               "data_device_bytes"]


@dataclass(frozen=True)
class Target:
    """The device an estimate is for: its class in DEVICES, and its exact name when it is this machine's."""

    key: str
    label: str
    name: str | None
    memory_bytes: int
    cores: int = 1


@dataclass(frozen=True)
class Fit:
    """Seconds for a cell = setup_s + multiplier x (step_s x batches + forward FLOPs / flops_per_s)."""

    step_s: float
    flops_per_s: float
    setup_s: float
    rows: int  # how many earlier rows calibrated it (0: the built-in figures)


@dataclass(frozen=True)
class CellEstimate:
    cell: Cell
    seconds: float | None
    basis: str  # measured (its own earlier rows), fitted (rows of this device), built-in, or why there is none
    memory_risk: str = ""


@dataclass(frozen=True)
class SuiteEstimate:
    target: Target
    fit: Fit
    cells: list[CellEstimate]
    calibration: str  # which rows calibrated it, in words

    @property
    def total_s(self) -> float:
        return sum(c.seconds for c in self.cells if c.seconds is not None)


def target_device(gpu: str | None = None) -> Target:
    """The named device class (`--gpu h100`), else this machine's first CUDA device, else its CPU."""
    import psutil

    if gpu:
        key = gpu.lower().replace(" ", "")
        if key not in DEVICES:
            raise BenchError(f"--gpu {gpu!r} is not a device bench has figures for{close_matches(key, DEVICES)}; "
                             f"choose one of {', '.join(DEVICES)}")
        memory = DEVICES[key].memory_bytes or psutil.virtual_memory().total
        return Target(key, key, None, memory, os.cpu_count() or 1)
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        key = device_class(name)
        label = name if key else f"{name} (no built-in figures of its own: the a100's until its rows calibrate it)"
        return Target(key or "a100", label, name, torch.cuda.get_device_properties(0).total_memory)
    from bench.measure import _cpu_model

    cores = torch.get_num_threads()
    return Target("cpu", f"cpu ({_cpu_model()}, {cores} threads)", _cpu_model(), psutil.virtual_memory().total, cores)


def device_class(gpu_name: str | None) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; None for a CPU or a GPU bench has no figures for."""
    if not gpu_name:
        return None
    name = re.sub(r"(rtx)\s+", r"\1", gpu_name.lower())
    for key in sorted(DEVICES, key=len, reverse=True):  # a100 before a10
        if key != "cpu" and re.search(rf"(?<![a-z0-9]){key}(?![0-9])", name):
            return key
    return None


def estimate(cells: list[Cell], *, results: Path, target: Target, measured: bool = True) -> SuiteEstimate:
    """Each cell's run time on `target`, from its FLOPs, image counts and epochs, calibrated by earlier rows;
    a cell with earlier ok rows of its own is its measured time (unless `measured` is false)."""
    from bench.store import ResultStore

    read = ResultStore(results).read(columns=ROW_COLUMNS, epochs=False)
    rows = _rows_of(read.cells, target)
    ok = rows[(rows["status"] == "ok") & rows["wall_s"].notna() & rows["flops_per_image"].gt(0)] if len(rows) else rows
    fit, observed = _fit(ok, target)
    out = []
    for cell in cells:
        mine = ok[ok["cell_id"] == cell.id] if len(ok) and measured else ok.iloc[0:0]
        risk = _memory_risk(cell, rows, target) if len(rows) else ""
        if len(mine):
            out.append(CellEstimate(cell, float(mine["wall_s"].median()), f"measured ({len(mine)} rows)", risk))
            continue
        work = _cell_work(cell, target)
        if work is None:
            out.append(CellEstimate(cell, None, f"unknown size of {cell.dataset}", risk))
            continue
        same = observed[observed["model"] == cell.model] if len(observed) else observed
        scale = float(same["ratio"].median()) if len(same) else 1.0
        seconds = fit.setup_s + scale * (fit.step_s * work[0] + work[1] / fit.flops_per_s)
        basis = ("fitted, model calibrated" if len(same) else "fitted") if fit.rows else "built-in (rough)"
        out.append(CellEstimate(cell, seconds, basis, risk))
    runs = sorted(ok["run_id"].unique()) if len(ok) else []
    calibration = (f"{len(ok)} ok rows of {target.label} in {results}/ (runs {', '.join(runs[-3:])}"
                   f"{' and earlier' if len(runs) > 3 else ''})" if len(ok) else
                   f"no earlier rows of {target.label} in {results}/: built-in figures, rough, guessed from public numbers")
    return SuiteEstimate(target, fit, out, calibration)


def _rows_of(cells: pd.DataFrame, target: Target) -> pd.DataFrame:
    """The earlier rows of the target device: its exact GPU (or CPU model) when there are any, else its class."""
    if cells.empty:
        return cells
    if target.key == "cpu":
        mine = cells[cells["device"].astype(str).eq("cpu")]
        exact = mine[mine["cpu_model"] == target.name] if target.name else mine.iloc[0:0]
    else:
        mine = cells[cells["gpu_name"].map(device_class) == target.key]
        exact = mine[mine["gpu_name"] == target.name] if target.name else mine.iloc[0:0]
    return (exact if len(exact) else mine).reset_index(drop=True)


def _train_factor(freeze: str) -> float:
    """Forward-FLOP equivalents per trained image: forward and backward are about 3 forward passes when all of
    the net trains; a frozen part runs forward only (a fraction freezes that share of the layers)."""
    if freeze == "none":
        return 3.0
    if freeze == "all":
        return 1.0
    try:
        share = float(freeze)
    except ValueError:
        return 2.0
    return 1 + 2 * (1 - share) if 0 < share < 1 else 2.0  # the last n layers: their share is unknown here


def _work(*, mode: str, batch: int, freeze: str, cached: bool, flops: float, train: int, val: int, test: int,
          steps: int, epochs: int, fp32_on_gpu: bool) -> tuple[float, float]:
    """(batches: optimizer steps and evaluation batches, forward-FLOP equivalents) of one cell."""
    flops *= 2 if fp32_on_gpu else 1  # no tensor-core bf16 path: about half the rate
    if mode == "throughput":
        return steps, steps * batch * _train_factor(freeze) * flops
    if cached:  # the backbone runs once over each split; the head's steps cost next to nothing
        return math.ceil((train + val + test) / batch), (train + val + test) * flops
    eval_images = val * epochs + test
    eval_batches = math.ceil(val / batch) * epochs + math.ceil(test / batch)
    return steps + eval_batches, (steps * batch * _train_factor(freeze) + eval_images) * flops


def _row_work(row, gpu: bool) -> tuple[float, float]:
    def count(value) -> int:
        return 0 if pd.isna(value) else int(value)

    return _work(mode=str(row.mode), batch=int(row.batch_size), freeze=str(row.freeze), cached=row.feature_cache_used is True,
                 flops=float(row.flops_per_image), train=count(row.train_images), val=count(row.val_images),
                 test=count(row.test_images), steps=count(row.steps_run), epochs=count(row.epochs_run),
                 fp32_on_gpu=gpu and row.precision == "fp32")


def _cell_work(cell: Cell, target: Target) -> tuple[float, float] | None:
    from bench.train import uses_feature_cache

    sizes = _dataset_sizes(cell.dataset, cell.label_column)
    if sizes is None:
        return None
    train, own_val, test, classes = sizes
    val = own_val if own_val is not None else int(round(cell.val_fraction * train))
    train -= 0 if own_val is not None else val
    if cell.train_subset is not None:
        train = min(train, cell.train_subset)
    if cell.test_subset is not None:
        test, val = min(test, cell.test_subset), min(val, cell.test_subset)
    if cell.mode == "throughput":
        steps = cell.throughput_warmup_steps + cell.throughput_steps
    else:
        steps = cell.epochs * max(1, train // cell.batch_size)
        steps = min(steps, cell.steps) if cell.steps else steps
    gpu = target.key != "cpu"
    fp32 = cell.precision == "fp32" or (cell.precision == "auto" and (not gpu or target.key in ("v100", "t4")))
    return _work(mode=cell.mode, batch=cell.batch_size, freeze=cell.freeze_label, cached=uses_feature_cache(cell),
                 flops=_flops(cell.model, cell.resolution, classes, cell.weights), train=train, val=val, test=test,
                 steps=steps, epochs=cell.epochs, fp32_on_gpu=gpu and fp32)


@functools.lru_cache(maxsize=None)
def _flops(model: str, resolution: int, classes: int, weights: str | None) -> float:
    from bench import models

    return float(models.flops_per_image(model, resolution, classes, weights=weights))


def _dataset_sizes(dataset: str, label_column: str | None = None) -> tuple[int, int | None, int, int] | None:
    """(train, own validation split or None, test, classes), without loading the images."""
    from bench import data, hfdata

    kind, arg = data.parse_name(dataset)
    if kind == "hf":
        return hfdata.sizes(arg, label_column=label_column)
    if kind in DATASET_SIZES:
        return DATASET_SIZES[kind]
    if kind == "synthetic":
        defaults = inspect.signature(data.synthetic_raw).parameters
        return defaults["train_size"].default, None, defaults["test_size"].default, defaults["num_classes"].default
    folder = Path(arg).expanduser()
    if not (folder / "train").is_dir():
        return None

    def count(split: str) -> int:
        return sum(len(files) for _, _, files in os.walk(folder / split)) if (folder / split).is_dir() else 0

    classes = sum(1 for p in (folder / "train").iterdir() if p.is_dir())
    return count("train"), count("valid") if (folder / "valid").is_dir() else None, count("test"), classes


def _fit(ok: pd.DataFrame, target: Target) -> tuple[Fit, pd.DataFrame]:
    """Fit step_s and flops_per_s to the earlier ok rows (relative least squares, both kept positive); setup_s is
    their median of wall time minus training and evaluation. Also each row's measured/fitted ratio."""
    base = DEVICES[target.key]
    flops_per_s = base.flops_per_s * (target.cores if target.key == "cpu" else 1)
    if ok.empty:
        return Fit(base.step_s, flops_per_s, base.setup_s, 0), pd.DataFrame(columns=["model", "ratio"])
    work = np.array([_row_work(r, target.key != "cpu") for r in ok.itertuples()], dtype=float)
    spent = (ok["train_s"].fillna(0) + ok["eval_s"].fillna(0)).to_numpy(dtype=float)
    step_s, per_flop = _positive_fit(work, spent, base.step_s, 1 / flops_per_s)
    setup_s = max(0.0, float(np.median(ok["wall_s"].to_numpy(dtype=float) - spent)))
    ratio = spent / (step_s * work[:, 0] + per_flop * work[:, 1])
    return Fit(step_s, 1 / per_flop, setup_s, len(ok)), pd.DataFrame({"model": ok["model"].to_numpy(), "ratio": ratio})


def _positive_fit(work: np.ndarray, spent: np.ndarray, step_s: float, per_flop: float) -> tuple[float, float]:
    """seconds ~ a x batches + c x flops, in relative error. Both from the rows when they tell the two apart;
    else c alone with the built-in a; else a alone with the built-in c."""
    relative = work / spent[:, None]
    if len(spent) >= 2 and np.linalg.cond(relative / np.linalg.norm(relative, axis=0)) < 1e3:  # the two tell apart
        (a, c), *_ = np.linalg.lstsq(relative, np.ones(len(spent)), rcond=None)
        if a > 0 and c > 0:
            return float(a), float(c)
    rest = 1 - step_s * relative[:, 0]
    c = float(relative[:, 1] @ rest / (relative[:, 1] @ relative[:, 1]))
    if c > 0:
        return step_s, c
    rest = 1 - per_flop * relative[:, 1]
    a = float(relative[:, 0] @ rest / (relative[:, 0] @ relative[:, 0]))
    return (a, per_flop) if a > 0 else (step_s, per_flop)


def _memory_risk(cell: Cell, rows: pd.DataFrame, target: Target) -> str:
    """Whether the cell will likely run out of memory, judged from earlier rows of the same model and freeze:
    an oom at no larger a batch of pixels, or an ok row's peak scaled by batch x resolution^2."""
    same = rows[(rows["model"] == cell.model) & (rows["freeze"].astype(str) == cell.freeze_label)]
    pixels = cell.batch_size * cell.resolution**2
    sizes = same["batch_size"].astype(float) * same["resolution"].astype(float) ** 2
    ooms = same[(same["status"] == "oom") & (sizes <= pixels)]
    if len(ooms):
        r = ooms.iloc[0]
        return f"oom before at bs {int(r['batch_size'])}, {int(r['resolution'])} px"
    found = _predicted_peak(cell, same, target)
    if found is None or not target.memory_bytes:
        return ""
    predicted, r = found
    if predicted > 0.9 * target.memory_bytes:
        return (f"~{predicted / GIB:.0f} of {target.memory_bytes / GIB:.0f} GiB "
                f"(scaled from bs {int(r['batch_size'])}, {int(r['resolution'])} px)")
    return ""


def expected_memory(cells: list[Cell], *, results: Path, target: Target) -> dict[str, float | None]:
    """Each cell's expected peak memory on `target` (its process's VRAM on a GPU, its PSS on the CPU), scaled from
    the nearest earlier ok row of the same model and freeze as the memory risk is; None where there is none."""
    from bench.store import ResultStore

    rows = _rows_of(ResultStore(results).read(columns=ROW_COLUMNS, epochs=False).cells, target)
    out: dict[str, float | None] = {}
    for cell in cells:
        same = rows[(rows["model"] == cell.model) & (rows["freeze"].astype(str) == cell.freeze_label)] if len(rows) \
            else rows
        found = _predicted_peak(cell, same, target) if len(same) else None
        out[cell.id] = found[0] if found else None
    return out


def _predicted_peak(cell: Cell, same: pd.DataFrame, target: Target) -> tuple[float, pd.Series] | None:
    """The cell's peak memory scaled by batch x resolution^2 from the nearest ok row in `same`, and that row."""
    pixels = cell.batch_size * cell.resolution**2
    sizes = same["batch_size"].astype(float) * same["resolution"].astype(float) ** 2
    measured = _memory_peaks(same, target)
    ok = same[(same["status"] == "ok") & measured.gt(0)]
    if ok.empty:
        return None
    i = int(np.abs(np.log(sizes[ok.index] / pixels)).argmin())
    r = ok.iloc[i]
    # The dataset on the device and the weights, gradients and optimizer state do not grow with the batch.
    fixed = sum(0.0 if pd.isna(v) else float(v) for v in (r["data_device_bytes"], 16 * r["total_params"]))
    peak = float(measured[ok.index[i]])
    return fixed + max(peak - fixed, 0) * pixels / (float(r["batch_size"]) * float(r["resolution"]) ** 2), r


def _memory_peaks(rows: pd.DataFrame, target: Target) -> pd.Series:
    """The memory a cell met, as the report shows it: on the CPU the process tree's PSS (RSS for rows from before
    PSS, which counts a page the cell's processes share once per process); on a GPU what the cell's process held on
    it (NVML, per process), the allocator's peak for rows from before that."""
    if target.key == "cpu":
        return pd.to_numeric(rows["peak_host_pss_bytes"].fillna(rows["peak_host_rss_bytes"]), errors="coerce")
    return pd.to_numeric(rows["peak_vram_process_bytes"].fillna(rows["peak_vram_allocated_bytes"]), errors="coerce")
