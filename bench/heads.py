"""Finding a network's classifier layers by one generic rule, and replacing them with new heads."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bench.errors import UnknownModelError
from bench.suite import Cell

PROBE_CLASSES = 7  # odd, unlike any width inside a network, so only the classifier layers change shape


def _shapes(model: nn.Module) -> dict[str, list[tuple[int, ...]]]:
    return {path: [tuple(p.shape) for p in m.parameters(recurse=False)] for path, m in model.named_modules()}


def find_heads(name: str, construct: Callable[[int], nn.Module]) -> tuple[str, ...]:
    """Every classifier layer of `construct(num_classes)`, main first: the layers whose shapes change between
    1000 and 7 classes. One rule for fc, classifier[-1], heads.head, SqueezeNet's 1x1 conv and auxiliary heads.
    """
    wide, narrow = construct(1000), construct(PROBE_CLASSES)
    before, after = _shapes(wide), _shapes(narrow)
    changed = [path for path in before if path in after and before[path] != after[path]]
    if not changed:
        raise UnknownModelError(
            f"{name}: no layer depends on the number of classes, so its classifier cannot be replaced; "
            "pick another model"
        )
    # The main head is the one timm names first (distilled models have two); otherwise the last registered, as
    # auxiliary heads branch off mid-network and are registered before the final classifier.
    named = getattr(wide, "pretrained_cfg", {}).get("classifier")
    named = [named] if isinstance(named, str) else list(named or [])
    main = next((path for path in named if path in changed), changed[-1])
    return (main, *(path for path in changed if path != main))


def new_head(old: nn.Module, num_classes: int, cell: Cell | None) -> nn.Module:
    """A fresh classifier shaped like `old`; given a cell, built to the cell's recipe (linear or mlp)."""
    if isinstance(old, nn.Linear):
        width, norm = old.in_features, nn.BatchNorm1d

        def layer(i: int, o: int, first: bool) -> nn.Module:
            return nn.Linear(i, o)
    elif isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a conv before its global pooling
        width, norm = old.in_channels, nn.BatchNorm2d

        def layer(i: int, o: int, first: bool) -> nn.Module:
            return nn.Conv2d(i, o, old.kernel_size, old.stride, old.padding) if first else nn.Conv2d(i, o, 1)
    else:
        kind = type(old).__name__
        raise UnknownModelError(f"cannot replace a classifier of type {kind}; bench replaces Linear and Conv2d heads")
    dropout = [nn.Dropout(cell.head_dropout)] if cell is not None and cell.head_dropout > 0 else []
    # A probe on frozen features normalises them first with a parameter-free BatchNorm (MAE's linear-probe
    # protocol): the head then trains at one learning rate whatever the scale of a backbone's features, which
    # for a random-init network can be hundreds of times ImageNet's.
    is_probe = cell is not None and cell.freeze == "all" and cell.probe_norm == "batchnorm"
    probe = [norm(width, affine=False, eps=1e-6)] if is_probe else []
    if cell is None or cell.head == "linear":
        layers = [*probe, *dropout, layer(width, num_classes, True)]
        return nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    hidden = cell.head_hidden
    bn = [norm(hidden)] if cell.head_bn else []
    relu = nn.ReLU(inplace=True)
    return nn.Sequential(*probe, layer(width, hidden, True), *bn, relu, *dropout, layer(hidden, num_classes, False))


def install_heads(model: nn.Module, paths: tuple[str, ...], num_classes: int, cell: Cell | None) -> tuple[str, ...]:
    """Replace the classifier layers the model has; the main one gets the cell's recipe, auxiliary ones stay
    linear. Returns the paths replaced, main first."""
    present = dict(model.named_modules())
    paths = tuple(p for p in paths if p in present)  # pretrained GoogLeNet has dropped its aux heads
    for index, path in enumerate(paths):
        model.set_submodule(path, new_head(present[path], num_classes, cell if index == 0 else None))
    return paths


def drop_aux_heads(model: nn.Module, aux_paths: tuple[str, ...]) -> None:
    """What torchvision's builders do when asked for no aux_logits (they refuse it together with weights):
    clear the flag the forward reads and remove each auxiliary branch, the top-level module holding its head."""
    model.aux_logits = False
    for path in aux_paths:
        setattr(model, path.split(".")[0], None)
