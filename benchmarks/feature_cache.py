"""A 10-epoch linear probe with feature caching against the same cell trained end to end with a
frozen backbone, on the real CIFAR-10 images (CPU or GPU), through the real runner.

    python benchmarks/feature_cache.py [--model tv:resnet18] [--train-images 10000] [--epochs 10]

Without ImageNet weights on this machine the backbone is randomly initialised; both sides freeze the
same backbone, so the comparison of time and accuracy holds all the same.
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
    parser.add_argument("--model", default="tv:resnet18")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pretrained", action="store_true", help="use the model's ImageNet weights (must be cached)")
    args = parser.parse_args()
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    folder = cifar_folder()
    dataset = f"imagefolder:{folder}" if folder else "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        suite = parse_suite({
            "name": "feature_cache", "dataset": dataset,
            "defaults": {"model": args.model, "freeze": "all", "augment": "none", "epochs": args.epochs,
                         "batch_size": args.batch_size, "pretrained": args.pretrained, "resolution": 32,
                         "train_subset": args.train_images, "test_subset": args.test_images},
            "grid": {"feature_cache": ["auto", "off"]},
        })
        data_root = folder.parent / "bench-data" if folder else Path(tmp)
        summary = run_suite(suite, expand(suite), RunOptions(results=Path(tmp), data_root=data_root, devices=(device,)))
    rows = [{"feature_cache": r["feature_cache"], "status": r["status"], "used": r.get("feature_cache_used"),
             "top1": r.get("top1"), "train_plus_eval_s": (r.get("train_s") or 0) + (r.get("eval_s") or 0),  # train_s holds the backbone pass
             "wall_s": r["wall_s"]} for r in summary.rows]
    print(f"\nlinear probe, {args.epochs} epochs, {args.model} frozen, {args.train_images} training images"
          f" ({'real CIFAR-10' if folder else 'synthetic'}) on {device}\n")
    print(table(rows, ["feature_cache", "status", "used", "top1", "train_plus_eval_s", "wall_s"]))
    if len(rows) == 2 and all(r["status"] == "ok" for r in rows):
        cached, direct = rows
        print(f"\nend-to-end / cached time ratio: {direct['train_plus_eval_s'] / cached['train_plus_eval_s']:.2f}"
              f" (wall: {direct['wall_s'] / cached['wall_s']:.2f}); top1 difference: {cached['top1'] - direct['top1']:+.4f}")


if __name__ == "__main__":
    main()
