"""Inputs follow the weights: each model's batches are normalised with its own weights' statistics, checked
against the libraries' own transforms on the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench import models
from bench.data import ImageArrays
from bench.loader import make_loader
from bench.recipe import IMAGENET_MEAN, IMAGENET_STD
from bench.suite import Cell

timm = pytest.importorskip("timm")


def _image(side: int) -> np.ndarray:
    rng = np.random.default_rng(side)
    return rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)


def _bench_batch(model: str, side: int, pretrained: bool = False) -> tuple[torch.Tensor, object]:
    """What a cell of `model` at `side` px feeds the network for one stored image (no augmentation)."""
    cell = Cell(model=model, resolution=side, pretrained=pretrained)
    backbone = models.build(cell, 10)
    arrays = ImageArrays(_image(side)[None], np.zeros(1, dtype=np.int64))
    loader = make_loader(arrays, batch_size=1, resolution=side, device=torch.device("cpu"), augment="none",
                         train=False, channels_last=False, seed=0, recipe=backbone.recipe)
    x, _ = next(iter(loader))
    return x[0], backbone.recipe


def test_torchvision_model_matches_its_weights_transforms():
    side = 64
    ours, recipe = _bench_batch("tv:resnet50", side)
    # The weights' own preset, with its geometry set to the image's size so only the pixel recipe is compared.
    preset = models.tv_member("resnet50", None).transforms(crop_size=side, resize_size=side)
    theirs = preset(Image.fromarray(_image(side)))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert recipe.interpolation == preset.interpolation.value


@pytest.mark.parametrize("model, mean", [
    ("timm:xception41", (0.5, 0.5, 0.5)),  # Inception-style statistics
    ("timm:vit_base_patch16_clip_224", (0.48145466, 0.4578275, 0.40821073)),  # CLIP's
])
def test_timm_models_match_timms_own_eval_transform(model, mean):
    side = 224 if "vit" in model else 96
    ours, recipe = _bench_batch(model, side)
    config = timm.data.resolve_model_data_config(timm.create_model(model.partition(":")[2], pretrained=False))
    # timm's evaluation transform with its own mean, std and interpolation; crop_pct 1 keeps the whole image.
    transform = timm.data.create_transform(**{**config, "input_size": (3, side, side), "crop_pct": 1.0})
    theirs = transform(Image.fromarray(_image(side)))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert recipe.mean == pytest.approx(mean) and tuple(config["mean"]) == pytest.approx(mean)
    assert recipe.interpolation == config["interpolation"]
    # Not ImageNet's statistics: with them the inputs would be off by this much.
    assert (ours - theirs).abs().max() < 1e-5 < abs(mean[0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0]


def test_random_init_uses_the_recipe_of_its_architectures_default_weights():
    default = models.input_recipe("timm:xception41")
    built = models.build(Cell(model="timm:xception41", resolution=96, pretrained=False), 10)
    assert built.recipe == default and built.weights is None
    swag = models.input_recipe("tv:vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    assert swag.interpolation == "bicubic" and models.input_recipe("tv:vit_b_16").interpolation == "bilinear"


def test_recipe_row_columns():
    row = models.input_recipe("timm:xception41").row()
    assert row == {"input_mean": [0.5, 0.5, 0.5], "input_std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                   "crop_pct": pytest.approx(0.903)}
