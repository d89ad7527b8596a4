"""Shared fixtures: the real CIFAR-10 images from ../shared/assets (skipped where absent) and a
GPU marker that skips visibly on machines without CUDA."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

# Before torch loads OpenMP: see bench/runner.py, _child_env (spinning threads on a shared 2-core machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ASSETS = Path(os.environ.get("BENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
CIFAR_JPG = ASSETS / "cifar10-jpg.tar.gz"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_jpg(tmp_path_factory) -> Path:
    """The real CIFAR-10 images as an image folder (train/ and test/), unpacked once per session."""
    if not CIFAR_JPG.is_file():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR_JPG} (only the project's machines have them)")
    root = tmp_path_factory.mktemp("cifar10-jpg")
    with tarfile.open(CIFAR_JPG) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def session_data_root(tmp_path_factory) -> Path:
    """A data root shared by the tests of a session, so the decoded-array cache is built once."""
    return tmp_path_factory.mktemp("data-root")


@pytest.fixture(scope="module")
def small_cpu_kernels():
    """One thread, no oneDNN, for a module of tiny-input model tests: oneDNN's per-shape kernels cost more than
    they save (one EfficientNet step at 8 px: 13 s with, 0.5 s without), and two OpenMP threads on a busy
    two-core machine spin against each other (100x slower forwards seen). Those tests check shapes, gradients
    and flags, not kernels."""
    import torch

    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn
