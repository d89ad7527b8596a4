"""The worker: one process runs one cell and writes its outcome as JSON for the runner.

Started as `python -m bench.worker SPEC.json RESULT.json`, or forked from the fork server (`bench/forkserver.py`),
which has imported `PRELOAD` already and calls `main`. Progress events go to stdout as JSON lines; the
traceback of a failure goes to stderr (the runner keeps it as the cell's log).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

STARTED = time.perf_counter()  # reset by `main` once the libraries are imported: setup_s starts there

if __name__ == "__main__":  # a fresh process: tie it to the runner first, before the heavy imports
    from bench.forkserver import die_with_parent

    die_with_parent()

from bench.atomic import atomic_text  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.result import Build, Inference, Part, Peaks, Provenance  # noqa: E402
from bench.status import OK, PAUSED, classify, message  # noqa: E402, F401 - callers import classify, message from here
from bench.suite import Cell  # noqa: E402

# What `work` imports: the fork server imports these once, a fresh worker before it says it is ready.
PRELOAD = ("torch", "torchvision", "bench.data", "bench.measure", "bench.models", "bench.train", "bench.worker")


def preload_modules(models: Iterable[str]) -> list[str]:
    """The modules a cell's process imports before it is ready; timm only where a model comes from it."""
    return [*PRELOAD, *(["timm"] if any(m.startswith("timm:") for m in models) else [])]


def emit(event: dict) -> None:
    print(json.dumps(event, default=str), flush=True)


def _inject_fault(cell: Cell) -> None:
    """Test hook: BENCH_FAULTS maps cell ids to a failure to act out (raise, sleep:S, alloc:BYTES,
    sigkill), so the runner's handling of each failure is tested on real processes."""
    action = json.loads(os.environ.get("BENCH_FAULTS", "{}")).get(cell.id)
    if not action:
        return
    kind, _, arg = action.partition(":")
    if kind == "raise":
        raise RuntimeError("injected failure")
    if kind == "sleep":
        time.sleep(float(arg))
    if kind == "alloc":
        import numpy as np

        block = np.ones(int(arg), dtype=np.uint8)  # touched pages: real resident memory
        time.sleep(2.0)
        del block
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)


def _progress(cell: Cell):
    """The train stage's events, to the runner; the test hook `sigkill_at_epoch:N` dies as epoch N's event is out
    (the state saved after the epochs before it, as a kill mid-epoch would find it)."""
    action = json.loads(os.environ.get("BENCH_FAULTS", "{}")).get(cell.id, "")
    kill_at = int(action.partition(":")[2]) if action.startswith("sigkill_at_epoch:") else None

    def progress(event: dict) -> None:
        emit({**event, "cell_id": cell.id})
        if kill_at is not None and event.get("kind") == "epoch" and event.get("epoch") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


def work(cell: Cell, spec: dict) -> tuple[dict[str, Part], list[dict], dict]:
    """Load data, build the model, train and evaluate; return the result's parts this process measured
    (bench/result.py) and the epoch table."""
    import torch

    from bench import data, measure, models, train
    from bench.train.infer import inference_cost

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    measure.reset_vram(device)
    torch.manual_seed(cell.seed)
    # NVML's view, sampled to peaks: the whole device (every process on it), and this process alone (what the
    # card must hold for the cell: its CUDA context and the allocator's reserve too)
    readers = {"device": measure.nvml_used_reader(device), "process": measure.nvml_process_reader(device)}
    samplers = {name: measure.PeakSampler(read) for name, read in readers.items() if read}
    for sampler in samplers.values():
        sampler.__enter__()
    try:
        splits = data.load_splits(cell.dataset, Path(spec["data_root"]) if spec.get("data_root") else None,
                                  val_fraction=cell.val_fraction, train_subset=cell.train_subset,
                                  test_subset=cell.test_subset, download=spec.get("download", True),
                                  stored_resolution=spec.get("stored_resolution"),
                                  image_column=cell.image_column, label_column=cell.label_column)
        num_classes = len(splits.classes)
        backbone = models.build(cell, num_classes)
        flops = _flops(models, cell, num_classes)
        _inject_fault(cell)
        checkpoint = _checkpoint(cell, spec)
        outcome = train.run_cell(cell, splits, backbone, device, num_classes, _progress(cell), checkpoint)
        peaks = measure.vram_peaks(device)  # training's; the inference measurement resets them
        inference = None
        if cell.infer_bench == "auto" and not outcome.paused:
            inference = _inference(inference_cost, backbone.model, cell, outcome.training.precision, device)
        if cell.save_model != "none" and spec.get("model_dir") and not outcome.paused:  # the runner moves it
            from bench import saved

            saved.save(Path(spec["model_dir"]), backbone.model, cell, splits.classes, backbone.recipe,
                       _stored_side(splits), outcome.row)
    finally:
        for sampler in samplers.values():
            sampler.__exit__(None, None, None)
    build = Build(
        num_classes=num_classes, class_names=splits.classes, train_images=len(splits.train),
        val_images=len(splits.val), test_images=len(splits.test), loader=splits.loader,
        stored_resolution=_stored_side(splits),
        trainable_params=backbone.trainable_params, total_params=backbone.total_params,
        frozen_layers=backbone.frozen_layers, total_layers=backbone.total_layers, weights=backbone.weights,
        **backbone.recipe.row(), **backbone.provenance(), flops_per_image=flops,
    )
    allocated = peaks["peak_vram_allocated_bytes"]
    measured = Peaks(
        setup_s=outcome.ready_at - STARTED, peak_vram_nvml_bytes=_peak(samplers, "device"),
        peak_vram_process_bytes=_peak(samplers, "process"),
        peak_host_maxrss_bytes=measure.host_maxrss_bytes(), **peaks,
        # training's own peak: the resident data set aside
        peak_vram_train_bytes=None if allocated is None else max(0, allocated - outcome.training.data_device_bytes),
    )
    provenance = Provenance(**measure.environment(device), torch_threads=torch.get_num_threads(),
                            cudnn_benchmark=torch.backends.cudnn.benchmark)
    parts: dict[str, Part] = {"build": build, "training": outcome.training, "accuracy": outcome.accuracy,
                              "peaks": measured, "provenance": provenance}
    if inference is not None:
        parts["inference"] = inference
    ending = {"status": PAUSED if outcome.paused else OK, "prior_wall_s": checkpoint.prior_wall_s if checkpoint else 0.0}
    return parts, outcome.epochs, ending


def _checkpoint(cell: Cell, spec: dict):
    """The cell's saved-state folder and what the runner asked of it (a race's pause), when it gave one."""
    from bench.train.checkpoint import Checkpoint

    if not spec.get("state_dir"):
        return None

    def warn(text: str) -> None:
        print(text, file=sys.stderr)
        emit({"kind": "warning", "cell_id": cell.id, "text": text})

    return Checkpoint(Path(spec["state_dir"]), cell, pause_at=spec.get("pause_at"),
                      forced=bool(spec.get("checkpoint_forced")), warn=warn)


def _peak(samplers: dict, name: str) -> int | None:
    """A sampler's peak; None where it never read a value (no NVML, or NVML never listed this process)."""
    return samplers[name].peak or None if name in samplers else None


def _inference(measure_cost, model, cell: Cell, precision: str, device) -> Inference | None:
    """The inference columns are measured after training: if they fail, the trained cell keeps its row and the
    log says why the columns are empty."""
    import torch

    try:
        return Inference(**measure_cost(model, cell, precision, device))
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        print(f"inference cost not measured: {exc.__class__.__name__}: {message(exc)}", file=sys.stderr)
        return None


def _stored_side(splits) -> int | None:
    """The side of the images the loaders start from: an image folder's stored resolution, CIFAR's 32."""
    if splits.stored_resolution is not None:
        return splits.stored_resolution
    images = getattr(splits.train, "images", None)
    return int(images.shape[1]) if images is not None and images.ndim == 4 else None


def _flops(models, cell: Cell, num_classes: int) -> int | None:
    """FLOPs are a nice-to-have column: a model the counter cannot trace still trains and gets a row."""
    try:
        return models.flops_per_image(cell.model, cell.resolution, num_classes, weights=cell.weights)
    except (NotImplementedError, RuntimeError, TypeError) as exc:
        print(f"flops_per_image not counted: {exc}", file=sys.stderr)
        return None


def failure_measurements(spec: dict) -> dict[str, Part]:
    """What a failed cell still measured: its peaks up to the failure, an OOM's most telling numbers."""
    import torch

    from bench import measure

    device = torch.device(spec["device"])
    vram = measure.vram_peaks(device) if device.type == "cuda" and torch.cuda.is_initialized() else {}
    return {"peaks": Peaks(peak_host_maxrss_bytes=measure.host_maxrss_bytes(), **vram)}


def _get_ready(cell: Cell) -> None:
    """Import what the cell needs (already there in a forked child), then tell the runner when that was done:
    from its launch to here is the row's start_s; from here to the first step, its setup_s."""
    global STARTED
    for name in preload_modules([cell.model]):
        importlib.import_module(name)
    STARTED = time.perf_counter()
    emit({"kind": "ready", "clock": time.clock_gettime(time.CLOCK_MONOTONIC)})


def _as_json(parts: dict[str, Part]) -> dict[str, dict]:
    """The parts as the runner reads them back (bench.result.parts_from_values)."""
    return {name: part.values() for name, part in parts.items()}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    cell = Cell.model_validate_json(spec["cell"])
    _get_ready(cell)
    try:
        parts, epochs, ending = work(cell, spec)
        result = {**ending, "parts": _as_json(parts), "epochs": epochs}
    except Exception as exc:  # noqa: BLE001 - every failure becomes a result row, none is swallowed
        if not isinstance(exc, BenchError):
            traceback.print_exc()
        result = {"status": classify(exc), "error": f"{exc.__class__.__name__}: {message(exc)}"[:2000],
                  "parts": _as_json(failure_measurements(spec))}
    atomic_text(Path(argv[2]), json.dumps(result, default=str), sync=False)  # read by the supervisor, once
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
