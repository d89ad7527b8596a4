"""Freeze policies with one meaning for every architecture, and frozen layers that stay in eval mode.

A *layer* is a module that owns parameters directly (`parameters(recurse=False)` is not empty), taken in
`named_modules()` order with the new head(s) left out. A ViT's class token and position embedding therefore
count as layers (their owners hold them directly), and a conv layer's BatchNorm is a layer of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from bench.errors import SuiteError
from bench.suite import FreezeSpec


def in_head(path: str, head_paths: Sequence[str]) -> bool:
    return any(path == head or path.startswith(head + ".") for head in head_paths)


def backbone_layers(model: nn.Module, head_paths: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The backbone's parameterised layers, input side first, heads excluded."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if not in_head(path, head_paths) and next(module.parameters(recurse=False), None) is not None
    ]


def frozen_count(freeze: FreezeSpec, total: int) -> int:
    """How many of `total` layers, counted from the input side, a freeze spec freezes."""
    if freeze == "none":
        return 0
    if freeze == "all":
        return total
    if isinstance(freeze, float) and 0 < freeze < 1:
        return int(freeze * total)
    if isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 1:
        return max(total - freeze, 0)  # "train the last n layers"
    raise SuiteError(f"freeze: {freeze!r} is not none, all, a fraction 0 < f < 1 or an integer n >= 1; fix the value")


def apply_freeze(model: nn.Module, head_paths: Sequence[str], freeze: FreezeSpec) -> tuple[int, int]:
    """Freeze the first layers of the backbone, keep the heads trainable, pin what is frozen in eval mode.

    Returns (frozen_layers, total_layers).
    """
    layers = backbone_layers(model, head_paths)
    frozen = frozen_count(freeze, len(layers))
    for index, (_, layer) in enumerate(layers):
        for param in layer.parameters(recurse=False):
            param.requires_grad_(index >= frozen)
    for path in head_paths:
        model.get_submodule(path).requires_grad_(True)
    for module in frozen_modules(model, head_paths):
        pin_eval(module)
    return frozen, len(layers)


def frozen_modules(model: nn.Module, head_paths: Sequence[str]) -> list[nn.Module]:
    """Every module that belongs to the frozen backbone, so runs in eval mode while the rest trains.

    A module with parameters belongs to it when all of them are frozen. A module without parameters (dropout,
    stochastic depth, an affine-free BatchNorm) follows its block: the nearest enclosing module with
    parameters, when that is wholly frozen; and when that block is partly trained (VGG's classifier holds
    frozen layers and the new head), the nearest parameterised layer before it, so the dropouts between VGG's
    frozen classifier layers rest while the head trains.
    """
    state: dict[str, bool | None] = {}  # path -> all frozen (True), partly or wholly trained (False), no params (None)
    found, previous_frozen = [], False
    for path, module in model.named_modules():
        if in_head(path, head_paths):
            continue
        params = list(module.parameters())
        own = list(module.parameters(recurse=False))
        if own:
            previous_frozen = not any(p.requires_grad for p in own)
        if params:
            state[path] = not any(p.requires_grad for p in params)
            frozen = state[path]
        else:
            block = _enclosing_block(path, state)
            frozen = state[block] if block is not None and state[block] else previous_frozen
        if frozen:
            found.append(module)
    return found


def _enclosing_block(path: str, state: dict[str, bool | None]) -> str | None:
    """The nearest ancestor of `path` that has parameters (named_modules visits ancestors first)."""
    while path:
        path = path.rpartition(".")[0]
        if state.get(path) is not None:
            return path
    return None


def pin_eval(module: nn.Module) -> None:
    """Keep a module in eval mode whatever `model.train()` later says."""
    module.train = functools.partial(_stay_in_eval, module)  # instance attribute shadows Module.train
    module.training = False


def is_pinned(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("train"), functools.partial)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    # Frozen means frozen: BatchNorm's running statistics are part of the pretrained weights (updating them from
    # the new dataset while gamma and beta stay fixed would shift every feature the frozen layers hand on), and
    # dropout or stochastic depth inside frozen layers would feed the head noisy features that the cached-feature
    # probe never sees. Children are pinned on their own, so not recursing loses nothing. A partial of a
    # module-level function (not a lambda) keeps the model picklable and deep-copyable.
    module.training = False
    return module
