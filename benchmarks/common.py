"""What the benchmarks share: where the real CIFAR-10 images are, and printing a table."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

ASSETS = Path(os.environ.get("BENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def cifar_folder() -> Path | None:
    """The real CIFAR-10 images unpacked once into a cache folder, or None where the asset is absent."""
    archive = ASSETS / "cifar10-jpg.tar.gz"
    target = Path(os.environ.get("BENCH_CIFAR_JPG", Path(tempfile.gettempdir()) / "bench-cifar10-jpg"))
    if (target / "test").is_dir():
        return target
    if not archive.is_file():
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain Markdown table, so the output can be pasted into RESULTS.md as it is."""
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
