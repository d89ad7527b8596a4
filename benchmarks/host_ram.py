"""Peak host RAM of one cell's whole process tree at 32 and 224 px, through the real runner.

    python benchmarks/host_ram.py [--model tv:mobilenet_v3_small] [--batch-size 16] [--steps 20]

On the real CIFAR-10 images (all 60,000) when ../shared/assets has them. The dataset stays uint8
(184 MB for 60,000 images) and every batch is resized on the device, so the peak does not grow with a
resized copy of the dataset (CIFAR-10 at 224 px in float32 would be 30 GB). On the CPU, activations
live in host RAM too, so the peak grows with resolution by the model's activation memory only.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.runner import RunOptions, run_suite
from bench.suite import expand, parse_suite
from benchmarks.common import cifar_folder, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tv:mobilenet_v3_small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    folder = cifar_folder()
    dataset = f"imagefolder:{folder}" if folder else "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        suite = parse_suite({
            "name": "host_ram", "dataset": dataset,
            "defaults": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "epochs": 1,
                         "pretrained": False, "test_subset": 512},
            "grid": {"resolution": [32, 224]},
        })
        data_root = folder.parent / "bench-data" if folder else Path(tmp)
        summary = run_suite(suite, expand(suite), RunOptions(results=Path(tmp), data_root=data_root, devices=(device,)))
    rows = [{"resolution": r["resolution"], "status": r["status"], "train_images": r.get("train_images"),
             "peak_host_rss_GiB": (r.get("peak_host_rss_bytes") or 0) / 2**30,
             "worker_maxrss_GiB": (r.get("peak_host_maxrss_bytes") or 0) / 2**30,
             "peak_vram_GiB": (r.get("peak_vram_allocated_bytes") or 0) / 2**30} for r in summary.rows]
    print(f"\npeak host RAM of one cell ({args.model}, batch {args.batch_size}, {args.steps} steps, {dataset.split(':')[0]}"
          f"{' real CIFAR-10, 60,000 images' if folder else ''}) on {device}\n")
    print(table(rows, ["resolution", "status", "train_images", "peak_host_rss_GiB", "worker_maxrss_GiB", "peak_vram_GiB"]))
    if len(rows) == 2 and rows[0]["peak_host_rss_GiB"]:
        print(f"\n224 px / 32 px peak host RAM ratio: {rows[1]['peak_host_rss_GiB'] / rows[0]['peak_host_rss_GiB']:.3f}")


if __name__ == "__main__":
    main()
