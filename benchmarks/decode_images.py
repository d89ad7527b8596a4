"""Decoding an image folder into its stored array: one thread against a pool of one thread per core, in images
per second, on the 60,000 real CIFAR-10 JPEGs (32 x 32, stored at their own 32 px), on a generated folder of
larger non-square JPEGs (640 x 480 and 480 x 640, stored at 224 px: short-side resize + centre crop), and on
two generated folders of small ones (short side 64 and 96 px, stored at that side), where the pool starts to
pay: bench decodes images of `imagefolder.SMALL_SIDE` px or less on one thread.

    python -m benchmarks.decode_images [--repeats N] [--large-images N] [--no-cifar]

Runs are interleaved (1 thread, pool, 1 thread, ...) and each figure is the median, so a neighbour's load on
a shared machine falls on both sides alike. The files are read once before timing: the page cache is warm
for every run, so the figures are decoding, not the disk. `cores_used` is the process's CPU time over the
wall time: near the thread count when the pool runs in parallel, near 1 when the GIL (or a busy machine)
serialises it; the load average before the runs is printed under the table. A last pair of rows hashes
memory (hashlib releases the GIL) with the same threads: the speedup the machine itself allows at that moment,
so a low decode speedup can be told apart from a busy or hyperthreaded machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import imagefolder
from benchmarks.common import cifar_folder, table


def generated_folder(root: Path, count: int, short: int = 480) -> list[str]:
    """`count` JPEGs with a 4:3 aspect, half landscape and half portrait (640 x 480 and 480 x 640 by default):
    smooth colour gradients with a little noise, so they compress like photographs rather than like static."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (short * 4 // 3, short) if i % 2 == 0 else (short, short * 4 // 3)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) * (480 / short)  # the same pattern at every size
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(xx / rng.uniform(20, 80) + yy / rng.uniform(20, 80)))[..., None]
        pixels = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def timed(work: Callable[[int], None], threads: int) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (every thread's) of one run of `work`."""
    started, cpu = time.perf_counter(), time.process_time()
    work(threads)
    return time.perf_counter() - started, time.process_time() - cpu


def measure(name: str, count: int, side: int | str, work: Callable[[int], None], repeats: int) -> list[dict]:
    """1 thread against the pool, interleaved, `repeats` times each; the median of each."""
    pool = imagefolder.decode_threads()
    runs: dict[int, list[tuple[float, float]]] = {1: [], pool: []}
    for _ in range(repeats):
        for threads in runs:
            runs[threads].append(timed(work, threads))
    rows = []
    for threads, timings in runs.items():
        median = statistics.median(wall for wall, _ in timings)
        cores = statistics.median(cpu / wall for wall, cpu in timings)
        rows.append({"images": name, "count": count, "stored_side": side, "threads": threads,
                     "seconds": median, "images_per_s": count / median, "cores_used": cores})
    rows[-1]["speedup"] = rows[0]["seconds"] / rows[-1]["seconds"]
    return rows


def measure_decode(name: str, paths: list[str], side: int, repeats: int) -> list[dict]:
    for p in paths:  # warm the page cache: every timed run then reads from memory
        Path(p).read_bytes()

    def work(threads: int) -> None:
        _, bad = imagefolder.decode_images(paths, side, threads=threads)
        assert not bad, f"unreadable files in the benchmark's folder: {list(bad)[:3]}"

    return measure(name, len(paths), side, work, repeats)


def measure_reference(repeats: int) -> list[dict]:
    """Hashing 64 blocks of 4 MiB: work that holds no GIL, split over the same threads."""
    blocks = [bytes(4 << 20)] * 64

    def work(threads: int) -> None:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda b: hashlib.sha256(b).digest(), blocks))

    rows = measure("reference: sha256, no GIL", len(blocks), "-", work, repeats)
    for row in rows:
        row.pop("images_per_s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-images", type=int, default=300)
    parser.add_argument("--cifar", action=argparse.BooleanOptionalAction, default=True,
                        help="include the 60,000 real CIFAR-10 images (about 20 s per repeat on 2 idle cores)")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = []
    cifar = cifar_folder() if args.cifar else None
    if args.cifar and cifar is None:
        print("real CIFAR-10 images not found (../shared/assets/cifar10-jpg.tar.gz): that row is skipped")
    elif cifar is not None:
        rows += measure_decode("CIFAR-10 JPEG 32x32", imagefolder.list_folder(cifar).all_paths(), 32, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generated_folder(Path(tmp) / "large", args.large_images)
        rows += measure_decode("JPEG 640x480 / 480x640", paths, 224, args.repeats)
        for short in (64, 96):
            paths = generated_folder(Path(tmp) / str(short), 1000, short)
            rows += measure_decode(f"JPEG {short * 4 // 3}x{short} / {short}x{short * 4 // 3}", paths, short,
                                   args.repeats)
    rows += measure_reference(args.repeats)
    print(table(rows, ["images", "count", "stored_side", "threads", "seconds", "images_per_s", "cores_used",
                       "speedup"]))
    print(f"\n{imagefolder.decode_threads()} threads in the pool; median of {args.repeats} interleaved runs each; "
          f"load average before: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min), after: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
