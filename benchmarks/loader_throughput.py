"""bench's device-resident loader against a plain torchvision DataLoader doing the same augmentation
(random crop with 4 px padding, flip, transforms.Resize to the target resolution, normalisation),
in images per second, at 32 and 224 px, measured in one run.

    python benchmarks/loader_throughput.py [--images N] [--workers W] [--json FILE]

Both produce normalised float batches on the device; the baseline decodes from the same uint8
array (no JPEG decoding on either side), so the ratio is the pipeline's, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from bench import data, loader, measure  # noqa: E402
from bench.recipe import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from benchmarks.common import cifar_folder, table  # noqa: E402


class ArrayImages(Dataset):
    def __init__(self, arrays: data.ImageArrays, transform):
        self.arrays, self.transform = arrays, transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.arrays.images[i])), int(self.arrays.labels[i])


def baseline_loader(arrays, resolution: int, batch_size: int, workers: int) -> DataLoader:
    recipe = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.Resize(resolution),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return DataLoader(ArrayImages(arrays, recipe), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=False)


def rate(loader, device: torch.device, max_batches: int) -> float:
    clock, images = None, 0
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        if i == 1:  # the first batch pays for worker start-up on both sides
            clock, images = measure.Clock(device), 0
        elif i > 1:
            images += len(y)
        if i >= max_batches:
            break
    return images / clock.total()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    folder = cifar_folder()
    if folder is not None:
        splits = data.load_splits(f"imagefolder:{folder}", folder.parent / "bench-data", train_subset=args.images)
        source = "real CIFAR-10 images"
    else:
        splits = data.load_splits("synthetic", train_subset=args.images)
        source = "synthetic images (CIFAR-10 asset not found)"
    rows = []
    for resolution in (32, 224):
        batches = max(4, min(len(splits.train) // args.batch_size - 1, 60 if resolution == 32 else 24))
        ours = loader.DeviceLoader(splits.train, batch_size=args.batch_size, resolution=resolution, device=device,
                                 augment="standard", train=True, channels_last=True, seed=0)
        mine = rate(ours, device, batches)
        theirs = rate(baseline_loader(splits.train, resolution, args.batch_size, args.workers), device, batches)
        rows.append({"resolution": resolution, "device_loader_img_s": mine, "dataloader_img_s": theirs,
                     "ratio": mine / theirs})
        print(f"  {resolution}px: device loader {mine:.0f} img/s, DataLoader({args.workers} workers) {theirs:.0f} img/s", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nloader throughput on {where}, {source}, batch {args.batch_size}, "
          f"baseline DataLoader with {args.workers} workers\n")
    print(table(rows, ["resolution", "device_loader_img_s", "dataloader_img_s", "ratio"]))
    if args.json:
        args.json.write_text(json.dumps({"device": where, "source": source, "batch_size": args.batch_size,
                                         "workers": args.workers, "images": len(splits.train), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
