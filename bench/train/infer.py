"""What the trained model costs to serve: throughput at the cell's batch size, latency at batch 1, the memory
a batch needs and the size of the weights, measured after training in eval mode at the cell's precision and
memory format, within a small time budget (`infer_budget_s`), apart from the training time. The model is measured
as it would be deployed: without what training leaves behind (gradients, optimizer state, the resident data)."""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
from torch import nn

from bench import measure
from bench.suite import Cell
from bench.train.step import autocast

MIN_LATENCY_SAMPLES = 50  # p95 of fewer samples is one unlucky repeat
MAX_LATENCY_SAMPLES = 500
WARMUP_BATCHES = 3  # cuDNN autotuning and allocator growth for the new shapes happen here, untimed


def model_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of the state dict's tensors as the cell would ship them: floating-point tensors in the cell's
    precision (bf16 and fp16 halve them), everything else as stored. torch.save adds a little on top."""
    half = precision in ("bf16", "fp16")
    total = 0
    for tensor in model.state_dict().values():
        size = 2 if half and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def release_training(model: nn.Module) -> None:
    """Free what training left on the device, so the inference peak starts from the weights alone: the last step's
    gradients (4 bytes a trainable parameter: 100 MB for ResNet-50) are dropped here; the optimizer's state and the
    loaders' resident data go with their last reference, and `gc.collect` frees those a reference cycle still holds
    (an LR scheduler can make one with its optimizer). The allocator's cache is emptied by `reset_vram`."""
    for param in model.parameters():
        param.grad = None
    gc.collect()


def _input(batch: int, cell: Cell, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 3, cell.resolution, cell.resolution, device=device)
    return x.contiguous(memory_format=torch.channels_last) if cell.channels_last else x


@torch.inference_mode()
def inference_cost(model: nn.Module, cell: Cell, precision: str, device: torch.device) -> dict:
    """The `infer_*` columns and `model_bytes`. Half the budget goes to throughput, half to latency; each
    measures at least one timed batch (and aims for 50 latency samples), so a slow model on a CPU can run
    past the budget by a batch or two."""
    model.eval()
    budget = cell.infer_budget_s / 2
    started = time.perf_counter()
    release_training(model)
    measure.reset_vram(device)  # the training peaks are read already; this peak is one batch's
    x = _input(cell.batch_size, cell, device)
    for _ in range(WARMUP_BATCHES):
        with autocast(precision, device):
            model(x)
    clock, batches = measure.Clock(device), 0
    # The budget is checked on the host clock without synchronising, so the device's queue never drains
    # between batches; the one synchronised read at the end is the measurement.
    while batches < 1 or (time.perf_counter() - clock.start < budget and batches < 100):
        with autocast(precision, device):
            model(x)
        batches += 1
    images_per_s = batches * cell.batch_size / clock.total()
    peak = measure.vram_peaks(device)["peak_vram_allocated_bytes"]
    latencies = _latencies_ms(model, cell, precision, device, budget)
    return {
        "infer_images_per_s": images_per_s,
        "infer_latency_ms_p50": float(np.percentile(latencies, 50)),
        "infer_latency_ms_p95": float(np.percentile(latencies, 95)),
        "infer_latency_samples": len(latencies),
        "infer_peak_vram_bytes": peak,
        "infer_s": time.perf_counter() - started,
        "model_bytes": model_bytes(model, precision),
    }


def _latencies_ms(model: nn.Module, cell: Cell, precision: str, device: torch.device, budget: float) -> list[float]:
    """Batch-1 forward times, each between two synchronisations (what one request waits for)."""
    x = _input(1, cell, device)
    for _ in range(WARMUP_BATCHES):
        with autocast(precision, device):
            model(x)
    samples: list[float] = []
    spent = 0.0
    while len(samples) < MAX_LATENCY_SAMPLES:
        clock = measure.Clock(device)
        with autocast(precision, device):
            model(x)
        samples.append(clock.total() * 1000)
        spent += samples[-1] / 1000
        # Enough samples once the budget is spent; a slow model stops at twice the budget with fewer samples
        # than hoped (infer_latency_samples says how many).
        if (spent >= budget and len(samples) >= MIN_LATENCY_SAMPLES) or spent >= 2 * budget:
            break
    return samples
