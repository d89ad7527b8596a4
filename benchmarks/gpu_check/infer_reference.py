"""What a model's inference needs when it never trained: its weights and one batch's activations, measured with
bench's own `inference_cost` on the cell's model freshly built in a fresh process. The GPU check holds a trained
cell's `infer_peak_vram_bytes` against it: whatever training left allocated (gradients, optimizer state, the
resident dataset) shows as the difference.

    python -m benchmarks.gpu_check.infer_reference --rows ROWS.json --json OUT.json

ROWS.json: a list of rows (cell_json, precision, num_classes, cell_id) as bench recorded them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REFERENCE_BUDGET_S = 0.4  # the peak is one batch's: the timing loops need not run long


def reference(row: dict, device) -> dict:
    """The weights' bytes on the device and the inference peak of the row's model, never trained."""
    import torch

    from bench import measure, models
    from bench.suite import Cell
    from bench.train.infer import _input, inference_cost
    from bench.train.step import autocast

    cell = Cell.model_validate_json(row["cell_json"]).model_copy(update={"infer_budget_s": REFERENCE_BUDGET_S})
    torch.manual_seed(cell.seed)
    if device.type == "cuda":
        # as the cell ran (bench/train/warmup.py); auto (None) as on: the step's cells leave it at its default, true
        torch.backends.cudnn.benchmark = cell.cudnn_benchmark is not False
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = models.build(cell, int(row["num_classes"])).model.to(device)
    if cell.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    weights = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
    # One forward at the batch size first: the trained cell's process had autotuned these shapes in training, so
    # cuDNN's trial workspaces must not inflate the reference either.
    with torch.inference_mode(), autocast(row["precision"], device):
        model(_input(cell.batch_size, cell, device))
    measure.sync(device)
    cost = inference_cost(model, cell, row["precision"], device)
    return {"cell_id": row["cell_id"], "weights_bytes": weights, "infer_peak_vram_bytes": cost["infer_peak_vram_bytes"]}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    out = []
    for row in json.loads(args.rows.read_text()):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.append(reference(row, device))
        print(json.dumps(out[-1]), flush=True)
    args.json.write_text(json.dumps({"device": str(device), "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
