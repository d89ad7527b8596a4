"""Harness step vs bare loop: images per second of bench's full training step (device loader with
augmentation and resize, the Stepper with its schedule, scaler and on-device metrics) against a
bare loop over one batch already on the device, same model, precision, memory format and optimizer.

    python benchmarks/harness_overhead.py            # CPU: small models at 32 px; GPU: adds 224 px
    python benchmarks/harness_overhead.py --quick
    python benchmarks/harness_overhead.py --config tv:resnet50:224:128 --repeats 3 --json rows.json

Each configuration alternates harness and bare measurements, pairs them, and reports the median of
the per-pair ratios: a noisy neighbour on a shared machine hurts both sides of a pair alike, and one
unusually fast or slow repeat cannot move a median. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench's CPU workers run (bench/runner.py)

import torch  # noqa: E402

from bench import data, measure, models, train  # noqa: E402
from bench.suite import Cell  # noqa: E402
from benchmarks.common import table  # noqa: E402


def configs(device: torch.device, quick: bool, chosen: list[str] | None = None) -> list[dict]:
    if chosen:  # MODEL:RESOLUTION:BATCH; the model name has a colon of its own (tv:resnet50)
        parts = [c.rsplit(":", 2) for c in chosen]
        return [dict(model=m, resolution=int(r), batch_size=int(b)) for m, r, b in parts]
    if device.type == "cuda":
        grid = [("tv:resnet50", 224, 128), ("tv:resnet18", 64, 256), ("tv:mobilenet_v3_large", 224, 128),
                ("tv:efficientnet_b0", 128, 256), ("tv:resnet18", 32, 512)]
    else:
        grid = [("tv:resnet18", 32, 64), ("tv:mobilenet_v3_small", 32, 64), ("tv:resnet18", 32, 16),
                ("tv:mobilenet_v3_small", 64, 32)]
    return [dict(model=m, resolution=r, batch_size=b) for m, r, b in (grid[:2] if quick else grid)]


def harness_rate(cell: Cell, splits, device: torch.device) -> float:
    """bench's own throughput mode: the real loader and step, timed after warm-up."""
    torch.manual_seed(0)
    backbone = models.build(cell, len(splits.classes))
    outcome = train.run_cell(cell, splits, backbone, device, len(splits.classes), lambda e: None)
    return outcome.row["images_per_s"]


def bare_rate(cell: Cell, device: torch.device, warmup: int, steps: int) -> float:
    """The floor: one fixed batch on the device, forward, loss, backward, SGD step; nothing else."""
    torch.manual_seed(0)
    model = models.build(cell, 10).model.to(device)
    fmt = torch.channels_last if cell.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    precision = train.resolve_precision(cell, device)
    # The same optimizer math as the cell (Nesterov SGD, weight decay on weights only): what the ratio
    # measures is the harness around the step (loader, augmentation, schedule, metrics), not the math.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(train.param_groups(trainable, cell.weight_decay), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(cell.batch_size, 3, cell.resolution, cell.resolution, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (cell.batch_size,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            clock = measure.Clock(device)
        with train.autocast(precision, device):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cell.batch_size / clock.total()


def measure_pair(cell: Cell, splits, device: torch.device, warmup: int, steps: int,
                 bare_first: bool) -> tuple[float, float]:
    """One harness and one bare measurement, in alternating order so neither side always runs second."""
    if bare_first:
        bare = bare_rate(cell, device, warmup, steps)
        return harness_rate(cell, splits, device), bare
    harness = harness_rate(cell, splits, device)
    return harness, bare_rate(cell, device, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two configurations, one repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved harness/bare pairs per config")
    parser.add_argument("--config", action="append", metavar="MODEL:RES:BATCH",
                        help="measure this configuration instead of the default grid (repeatable), e.g. tv:resnet18:32:512")
    parser.add_argument("--warmup", type=int, help="warm-up steps per measurement (default 10 on a GPU, 3 on the CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 50 on a GPU, 25 on the CPU)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    warmup, steps = (10, 50) if device.type == "cuda" else (3, 25)
    warmup, steps = args.warmup if args.warmup is not None else warmup, args.steps or steps
    repeats = 1 if args.quick else args.repeats
    rows = []
    for cfg in configs(device, args.quick, args.config):
        # cuda_graphs off: the bare loop it is compared with runs eager steps, so the harness must too
        cell = Cell(dataset="synthetic", pretrained=False, mode="throughput", throughput_warmup_steps=warmup,
                    cuda_graphs="off",
                    throughput_steps=steps, train_subset=cfg["batch_size"] * (warmup + steps), **cfg)
        splits = data.load_splits("synthetic", train_subset=cell.train_subset, test_subset=64)
        pairs = [measure_pair(cell, splits, device, warmup, steps, bare_first=i % 2 == 1) for i in range(repeats)]
        ratios = [h / b for h, b in pairs]
        row = {**cfg, "precision": train.resolve_precision(cell, device),
               "harness_img_s": statistics.median(h for h, _ in pairs),
               "bare_img_s": statistics.median(b for _, b in pairs),
               "ratio": statistics.median(ratios), "ratio_range": f"{min(ratios):.2f}-{max(ratios):.2f}"}
        rows.append(row)
        print(f"  {cfg['model']} {cfg['resolution']}px bs{cfg['batch_size']}: harness {row['harness_img_s']:.0f} "
              f"img/s, bare {row['bare_img_s']:.0f} img/s, median ratio {row['ratio']:.3f} "
              f"(pairs {row['ratio_range']})", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nharness vs bare training step on {name}, torch {torch.__version__}\n")
    print(table(rows, ["model", "resolution", "batch_size", "precision", "harness_img_s", "bare_img_s", "ratio",
                           "ratio_range"]))
    print("\nratio: median over the pairs; ratio_range: the smallest and largest pair")
    print(f"\nharness/bare min ratio: {min(r['ratio'] for r in rows):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "warmup_steps": warmup,
                                         "timed_steps": steps, "repeats": repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
