"""What the trained model costs to serve: the inference columns are filled, sane, and rank models by depth."""

from __future__ import annotations

import torch

from bench import models
from bench.suite import Cell
from bench.train.infer import MIN_LATENCY_SAMPLES, inference_cost, model_bytes

CPU = torch.device("cpu")


def _cost(model_name: str, resolution: int = 64, **fields) -> dict:
    cell = Cell(model=model_name, resolution=resolution, batch_size=8, pretrained=False, infer_budget_s=2.0, **fields)
    torch.manual_seed(0)
    return inference_cost(models.build(cell, 10).model, cell, "fp32", CPU)


def test_inference_columns_are_filled_and_sane():
    cost = _cost("tv:resnet18", resolution=32)  # a few ms a forward: 50 samples fit the budget
    assert cost["infer_images_per_s"] > 0 and cost["infer_latency_samples"] >= MIN_LATENCY_SAMPLES
    assert 0 < cost["infer_latency_ms_p50"] <= cost["infer_latency_ms_p95"]
    # A batch of 8 is not slower per image than 8 requests one at a time.
    assert cost["infer_images_per_s"] > 0.5 * 1000 / cost["infer_latency_ms_p50"]
    assert cost["infer_peak_vram_bytes"] is None  # no allocator on the CPU
    params = sum(p.numel() for p in models.build(Cell(model="tv:resnet18", pretrained=False), 10).model.parameters())
    assert params * 4 < cost["model_bytes"] < params * 4 * 1.01  # fp32 weights plus BatchNorm's statistics
    assert cost["infer_s"] < 6.0  # the budget (2 s) plus warm-up, with room for a busy machine


def test_a_model_twice_as_deep_is_slower_to_serve():
    shallow, deep = _cost("tv:resnet18"), _cost("tv:resnet34")  # 1.8 vs 3.7 GFLOPs at 224 px
    assert deep["infer_latency_ms_p50"] > shallow["infer_latency_ms_p50"]
    assert deep["model_bytes"] > 1.8 * shallow["model_bytes"]


def test_model_bytes_follow_the_precision():
    model = models.build(Cell(model="tv:resnet18", pretrained=False), 10).model
    assert model_bytes(model, "bf16") < 0.51 * model_bytes(model, "fp32")


def test_a_train_cell_records_inference_cost_and_off_skips_it(tmp_path):
    from bench.runner import RunOptions, run_suite
    from bench.suite import expand, parse_suite

    suite = parse_suite({"name": "infer", "dataset": "synthetic",
                         "defaults": {"model": "tv:resnet18", "pretrained": False, "steps": 2, "batch_size": 16,
                                      "train_subset": 64, "test_subset": 32, "infer_budget_s": 0.5},
                         "grid": {"infer_bench": ["auto", "off"]}})
    rows = {r["infer_bench"]: r for r in run_suite(suite, expand(suite), RunOptions(results=tmp_path)).rows}
    assert rows["auto"]["status"] == "ok" and rows["auto"]["infer_latency_ms_p95"] >= rows["auto"]["infer_latency_ms_p50"] > 0
    assert rows["auto"]["model_bytes"] > 0 and rows["auto"]["infer_s"] > 0
    assert rows["off"]["status"] == "ok" and rows["off"].get("infer_latency_ms_p50") is None
