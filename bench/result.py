"""One cell's result, typed: the parts of its row, each filled by the one stage that measures it, and the
Parquet schema derived from them (the only list of columns there is).

    part        filled by                                   holds
    identity    the runner (bench/runner.py)                run, suite, cell ids; status and error
    config      the runner, from the `Cell`                 every cell field, as the suite resolved it
    process     the cell's supervisor (bench/cellproc.py)   wall-clock, start, the process tree's host memory
    build       the worker (bench/worker.py)                data and model as built, the input recipe used
    training    the train stage (bench/train/)              plan used, steps, training and evaluation time
    accuracy    the train stage (bench/train/)              every accuracy and loss figure, test_correct
    peaks       the worker (bench/worker.py)                setup time, device memory peaks, the worker's max RSS
    inference   the inference stage (bench/train/infer.py)  the trained model's inference cost
    provenance  the worker, else the driver (bench/measure) machine and library versions

A column belongs to one part. The only columns two parts share are config fields that a later part replaces by
the value the run used (`RESOLVES`: `precision: auto` becomes `bf16`, `lr: null` the default learning rate); the
schema is checked for that when this module loads. Units are in the names (_s, _bytes, _per_s); accuracies are
fractions in [0, 1]. Adding a column is adding a field to its part: the schema, the store and the report's
normalisation follow, and older files read with the new column empty.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa

from bench.suite import Cell

_TIME = pa.timestamp("us", tz="UTC")
_SCALARS: dict[type, pa.DataType] = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(),
                                     datetime: _TIME}


def arrow_type(hint: Any) -> pa.DataType:
    """The Parquet column type of a Python annotation: optional scalars, Literals of strings, lists and tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return arrow_type(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {arrow_type(a) for a in args if a is not type(None)}
        if len(kinds) != 1:
            raise TypeError(f"{hint}: a column has one type; this annotation gives {sorted(map(str, kinds))}")
        return kinds.pop()
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1:
            raise TypeError(f"{hint}: a Literal column needs values of one type")
        return _SCALARS[kinds.pop()]
    if origin in (list, tuple):
        items = {arrow_type(a) for a in args if a is not Ellipsis}
        if len(items) != 1:
            raise TypeError(f"{hint}: a list column needs items of one type")
        return pa.list_(items.pop())
    if hint in _SCALARS:
        return _SCALARS[hint]
    raise TypeError(f"{hint}: no Parquet type for this annotation")


class Part:
    """A part of the row: a frozen dataclass whose fields are columns, every one optional (a failed cell fills
    some). Its stage builds it whole; anyone else changes it only by `dataclasses.replace`, in plain sight."""

    RESOLVES: ClassVar[frozenset[str]] = frozenset()  # config columns this part replaces with the value used

    @classmethod
    def columns(cls) -> dict[str, pa.DataType]:
        hints = typing.get_type_hints(cls)
        return {f.name: arrow_type(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_values(cls, values: dict[str, Any]):
        """The part from its columns (as a worker sends them); a key that is not one of them is a bug, said."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no columns {unknown}; add them to bench/result.py")
        return cls(**values)

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(kw_only=True, frozen=True)
class Identity(Part):
    run_id: str | None = None
    suite: str | None = None
    suite_hash: str | None = None
    cell_id: str | None = None
    group_id: str | None = None  # the cell's id without its seed: rows of one config over seeds share it
    status: str | None = None  # ok, oom, killed, timeout, error, unavailable, dropped (bench/status.py)
    error: str | None = None
    cell_json: str | None = None  # the whole cell, canonical JSON
    race_rung: int | None = None  # a raced cell: the last rung it reached (0 the first); dropped there, or finished


_NOT_CONFIG = {"freeze", "suite"}


def config_columns() -> dict[str, pa.DataType]:
    """The config part: one column per `Cell` field, typed from its annotation. `freeze` holds the label
    (`none`, `all`, `0.5`, `3`), as a string; `suite` is identity's."""
    out = {name: arrow_type(field.annotation) for name, field in Cell.model_fields.items() if name not in _NOT_CONFIG}
    out["freeze"] = pa.string()
    return out


def config_values(cell: Cell) -> dict[str, Any]:
    values = cell.model_dump(exclude={"suite"})
    values["freeze"] = cell.freeze_label
    for name in ("input_mean", "input_std"):  # tuples in the cell, lists in Parquet
        if values.get(name) is not None:
            values[name] = list(values[name])
    return values


@dataclass(kw_only=True, frozen=True)
class Process(Part):
    """The cell's supervisor, watching its process from outside."""

    wall_s: float | None = None  # launch to end, as the supervisor saw it
    start_s: float | None = None  # launch to the worker's "ready" (libraries imported)
    start_method: str | None = None  # forkserver or subprocess
    started_at: datetime | None = None
    finished_at: datetime | None = None
    peak_host_pss_bytes: int | None = None  # the process tree's, shared pages counted once
    peak_host_rss_bytes: int | None = None  # the tree's, summed: a cross-check that counts shared pages twice
    concurrent_cells: int | None = None  # the most cells (this one included) that shared its device and host


@dataclass(kw_only=True, frozen=True)
class Build(Part):
    """The data and the model as the worker built them."""

    RESOLVES: ClassVar[frozenset[str]] = frozenset({"weights", "input_mean", "input_std"})

    num_classes: int | None = None
    class_names: list[str] | None = None
    train_images: int | None = None
    val_images: int | None = None
    test_images: int | None = None
    loader: str | None = None  # resident or streaming
    stored_resolution: int | None = None  # the side of the images the loaders start from
    weights: str | None = None
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    frozen_layers: int | None = None
    total_layers: int | None = None
    flops_per_image: int | None = None
    model_source_file: str | None = None  # py: models
    model_source_sha256: str | None = None
    weights_sha256: str | None = None  # weights files


@dataclass(kw_only=True, frozen=True)
class Training(Part):
    """The train stage's plan and clock: what it ran, for how long."""

    RESOLVES: ClassVar[frozenset[str]] = frozenset({"precision", "lr", "cuda_graphs"})

    precision: str | None = None
    lr: float | None = None
    cuda_graphs: str | None = None  # on or off: whether the steps replayed a captured CUDA graph
    epochs_run: int | None = None
    steps_run: int | None = None
    train_s: float | None = None
    eval_s: float | None = None
    warmup_s: float | None = None
    warmup_steps: int | None = None
    compile_s: float | None = None  # with compile: the warm-up, where torch.compile's work happens
    images_per_s: float | None = None  # steady state, after the warm-up steps; empty for a cached probe
    feature_cache_used: bool | None = None
    feature_extract_s: float | None = None  # a cached probe's pass over the training images (inside train_s)
    data_device_bytes: int | None = None  # the resident dataset's share of device memory
    resumed_from_epoch: int | None = None  # epochs already done in saved state when the last segment began (0: none)
    segments: int | None = None  # processes the cell's training ran in (1: straight through)


@dataclass(kw_only=True, frozen=True)
class Accuracy(Part):
    """Every figure of how well the cell learned: test on the weights validation chose (restore_best)."""

    top1: float | None = None
    top5: float | None = None
    val_top1_best: float | None = None
    val_top1_final: float | None = None
    val_top1_tested: float | None = None  # validation top-1 of the weights the test pass used: what ranks a config
    train_loss_final: float | None = None
    val_loss_final: float | None = None
    target_reached: bool | None = None
    time_to_target_s: float | None = None
    test_epoch: int | None = None
    per_class_top1: list[float] | None = None
    per_class_precision: list[float] | None = None
    per_class_recall: list[float] | None = None
    confusion_matrix: list[list[int]] | None = None
    test_correct: str | None = None  # which test images were right, bit-packed (bench/train/metrics.py)


@dataclass(kw_only=True, frozen=True)
class Peaks(Part):
    """What the worker measured around the train stage: its setup, its memory peaks."""

    setup_s: float | None = None  # libraries imported to the first training step: data and model built
    peak_vram_allocated_bytes: int | None = None
    peak_vram_reserved_bytes: int | None = None
    peak_vram_nvml_bytes: int | None = None  # the whole device, as the driver sees it
    peak_vram_train_bytes: int | None = None  # allocated, less the resident dataset: the model and its training
    peak_vram_process_bytes: int | None = None  # what the cell's process held on its GPU (NVML, per process)
    peak_host_maxrss_bytes: int | None = None  # the worker process alone (its own high-water mark)


@dataclass(kw_only=True, frozen=True)
class Inference(Part):
    """The trained model's inference cost, measured after training within `infer_budget_s`."""

    infer_images_per_s: float | None = None
    infer_latency_ms_p50: float | None = None
    infer_latency_ms_p95: float | None = None
    infer_latency_samples: int | None = None
    infer_peak_vram_bytes: int | None = None
    infer_s: float | None = None
    model_bytes: int | None = None


@dataclass(kw_only=True, frozen=True)
class Provenance(Part):
    """Where the row came from: the worker's view, or the driver's for a cell whose worker never reported."""

    RESOLVES: ClassVar[frozenset[str]] = frozenset({"cudnn_benchmark"})

    device: str | None = None  # the GPU the runner gave the cell, e.g. cuda:1
    gpu_name: str | None = None
    gpu_count: int | None = None  # the machine's
    driver_version: str | None = None
    cuda_version: str | None = None
    cudnn_version: str | None = None
    torch_version: str | None = None
    torchvision_version: str | None = None
    timm_version: str | None = None
    python_version: str | None = None
    torch_threads: int | None = None
    cudnn_benchmark: bool | None = None
    cpu_model: str | None = None
    hostname: str | None = None
    scheduler_job_id: str | None = None  # the SLURM job that ran the cell (sacct -j ID); empty elsewhere
    bench_version: str | None = None
    git_commit: str | None = None


# The measured parts, by the name a worker's result and an executor's outcome use for them; row order follows.
PARTS: dict[str, type[Part]] = {"build": Build, "training": Training, "accuracy": Accuracy, "peaks": Peaks,
                                "inference": Inference, "process": Process, "provenance": Provenance}


@dataclass(frozen=True)
class CellResult:
    """A cell's row: who ran it and how it ended (identity), what it was (the cell) and what each stage measured.
    Parts a cell never reached are absent, and their columns empty."""

    identity: Identity
    cell: Cell
    parts: dict[str, Part] = dataclasses.field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The flat row the store writes: identity, config, then each part present, in PARTS order. A part's
        resolved value replaces the config's where it has one (the driver's provenance for a cell whose worker
        never reported knows nothing of `cudnn_benchmark`: the cell's setting stays)."""
        row = {**self.identity.values(), **config_values(self.cell)}
        for name in PARTS:
            if name in self.parts:
                part = self.parts[name]
                row.update((k, v) for k, v in part.values().items() if v is not None or k not in part.RESOLVES)
        return row


def parts_from_values(values: dict[str, dict[str, Any]]) -> dict[str, Part]:
    """Parts from their JSON form ({part name: {column: value}}), as a worker writes them."""
    unknown = sorted(set(values) - set(PARTS))
    if unknown:
        raise ValueError(f"no result parts named {unknown}; the parts are {sorted(PARTS)}")
    return {name: PARTS[name].from_values(v) for name, v in values.items()}


def _cell_schema() -> pa.Schema:
    columns: dict[str, pa.DataType] = {**Identity.columns()}
    owner = dict.fromkeys(columns, "identity")
    config = config_columns()
    for name, kind in config.items():
        if name in columns:
            raise TypeError(f"config field {name!r} is also an identity column; rename one")
        columns[name], owner[name] = kind, "config"
    for part_name, part in PARTS.items():
        for name, kind in part.columns().items():
            if name in columns:
                if owner[name] != "config" or name not in part.RESOLVES:
                    raise TypeError(f"column {name!r} is in both {owner[name]} and {part_name}; a column has one part")
                if columns[name] != kind:
                    raise TypeError(f"column {name!r}: {part_name} resolves it as {kind}, the config has {columns[name]}")
                continue
            if name in part.RESOLVES:
                raise TypeError(f"{part_name} resolves {name!r}, which is no config field")
            columns[name], owner[name] = kind, part_name
    return pa.schema(list(columns.items()))


@dataclass(kw_only=True, frozen=True)
class EpochRecord(Part):
    """One row of a cell's epoch table (or throughput window): what `bench/train` reports after each epoch."""

    run_id: str | None = None
    suite: str | None = None
    cell_id: str | None = None
    epoch: int | None = None
    step: int | None = None
    lr: float | None = None
    train_loss: float | None = None
    train_top1: float | None = None
    val_loss: float | None = None
    val_top1: float | None = None
    epoch_s: float | None = None
    images_per_s: float | None = None


CELL_SCHEMA = _cell_schema()
EPOCH_SCHEMA = pa.schema(list(EpochRecord.columns().items()))
