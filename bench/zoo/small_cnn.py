"""The handcrafted CNN of the scratch-versus-transfer study (`suites/studies/cifar10_scratch_vs_transfer.yaml`),
and an example of a `py:` model: `model: py:bench.zoo.small_cnn:small_cnn`.

The shape studies of this kind train from scratch on CIFAR-10: three blocks of two 3x3 convolutions (32, 64 and
128 channels, BatchNorm, ReLU), each ending in 2x2 max pooling and dropout, then a dense ReLU layer and the
classifier. Global average pooling instead of a flatten lets it take any resolution from 8 px up, so the
resolution grid and FLOPs work for it as for the registry's models.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def _block(cin: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(dropout),
    )


def small_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """About 0.32 M parameters for 10 classes; `classifier.3` is the layer bench replaces with its head."""
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(_block(3, width, 0.2), _block(width, 2 * width, 0.3), _block(2 * width, 4 * width, 0.4)),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        classifier=nn.Sequential(nn.Linear(4 * width, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                 nn.Linear(256, num_classes)),
    ))
    # timm's convention, which bench reads for any model: the size it was designed for (its native size in
    # `bench models`) and the statistics its inputs are normalised with (CIFAR-10's: it sees no ImageNet weights).
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    return model
