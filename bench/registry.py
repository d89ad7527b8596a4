"""The backbone registry: model names (torchvision; timm when installed; your own, `py:`) and the one place the
libraries build a model from one, for real or as a skeleton.

Names are canonical `tv:NAME`, `timm:NAME` (or `timm:hf-hub:ORG/NAME`, a repo in the hub cache) or
`py:MODULE:FACTORY` (see `bench.zoo`); a bare name is torchvision's. What needs only shapes (parameter
counts, accepted resolutions, FLOPs, where the classifier is) is worked out on a *skeleton*: the model with its
parameters on the meta device, which costs no memory, no init time and never a download.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_buffer_registration_hook as on_buffer
from torch.nn.modules.module import register_module_parameter_registration_hook as on_parameter
from torchvision.models import get_model
from torchvision.models._api import WeightsEnum

from bench import weights as files
from bench import zoo
from bench.errors import UnknownModelError, close_matches
from bench.heads import drop_aux_heads, find_heads
from bench.weights import HUB_PREFIX, HUB_TAG, tv_member

SOURCES = {"tv": "torchvision", "timm": "timm", "py": "python"}
LISTED = ("tv", "timm")  # the sources with a list of names; a py: name is a factory, found by importing it


# --- registry -----------------------------------------------------------------------------------------------------


def _timm():
    """timm is an optional extra: imported only when a timm: name is used."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def _require_timm():
    timm = _timm()
    if timm is None:
        raise UnknownModelError("timm: models need timm, which is not installed; run `pip install 'bench[timm]'`")
    return timm


@functools.cache
def _names(source: str) -> tuple[str, ...]:
    if source == "tv":
        return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))
    return tuple(sorted(_require_timm().list_models()))


def _split(pattern: str) -> tuple[str, str]:
    prefix, sep, rest = pattern.partition(":")
    if not sep:
        return "tv", pattern
    if prefix not in SOURCES:
        raise UnknownModelError(
            f"{pattern!r}: unknown prefix {prefix!r}; write tv:NAME, timm:NAME or a bare torchvision name"
        )
    return prefix, rest


def list_models(pattern: str | None = None) -> list[str]:
    """Canonical names, sorted, optionally filtered by a glob; a bare glob searches torchvision. A py: or
    timm:hf-hub: name is no glob but itself, once its factory runs (py:) or timm is installed (hf-hub:)."""
    if pattern is None:
        return [f"{s}:{n}" for s in LISTED if s == "tv" or _timm() is not None for n in _names(s)]
    source, glob = _split(pattern)
    if source == "py":
        _on_meta(lambda: zoo.call(glob, 1000))  # imports, runs and checks the factory: `bench validate` says what fails
        return [pattern]
    if source == "timm" and glob.startswith(HUB_PREFIX):
        _require_timm()
        return [pattern]
    return [f"{source}:{n}" for n in _names(source) if fnmatch.fnmatchcase(n, glob)]


def resolve(pattern: str) -> list[str]:
    """A name or glob -> canonical names; nothing found raises UnknownModelError with the close matches."""
    found = list_models(pattern)
    if found:
        return found
    source, bare = _split(pattern)
    arch, dot, tag = bare.partition(".")
    if source == "timm" and dot and arch in _names(source):
        raise UnknownModelError(
            f"{pattern!r}: timm pretrained tags go in the weights field; write model: timm:{arch} and weights: {tag}"
        )
    choices = _names(source) if source == "tv" else [f"timm:{n}" for n in _names(source)]
    hint = close_matches(bare if source == "tv" else pattern, choices)
    raise UnknownModelError(f"{pattern!r} matches no {SOURCES[source]} classifier{hint}; `bench models` lists them all")


def _canonical(name: str) -> str:
    found = resolve(name)
    if len(found) != 1 or any(c in name for c in "*?["):
        raise UnknownModelError(f"{name!r} is a pattern matching {len(found)} models; name one, e.g. {found[0]}")
    return found[0]



# --- building: skeletons on meta, real models ---------------------------------------------------------------------


@contextmanager
def meta_init():
    """Build modules with every parameter and buffer on the meta device: no memory, no init cost.

    Unlike `with torch.device("meta")`, constructors may still compute with real tensors (RegNet derives its
    widths with torch ops and `.tolist()`); only what a module registers moves. The hooks are global: not
    thread-safe.
    """

    def to_meta(module, name, tensor):
        if tensor is None:
            return None
        meta = tensor.to("meta")
        return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta

    handles = [on_parameter(to_meta), on_buffer(to_meta)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _architecture_only():
    # torchvision builders derive the architecture from the weights (image size, aux heads, transform_input) and
    # then read the file; running them with loading stubbed out gives the architecture alone, generically.
    # Patches classes for the duration: not thread-safe, like meta_init.
    with mock.patch.object(WeightsEnum, "get_state_dict", lambda self, *a, **k: {}):
        with mock.patch.object(nn.Module, "load_state_dict", lambda self, *a, **k: None):
            yield


def _on_meta(construct: Callable[[], nn.Module]) -> nn.Module:
    try:  # everything on meta, the dummy forwards some constructors run included (timm's hybrid ViTs)
        with torch.device("meta"):
            return construct()
    except NotImplementedError:  # "Cannot copy out of meta tensor": RegNet computes its widths with tensor ops
        with meta_init():
            return construct()


def _create(
    name: str, weights: str | None, *, meta: bool, load: bool = False, aux: bool = True, num_classes: int | None = None
) -> nn.Module:
    """The one place the libraries build models: `weights` picks the architecture, `load` reads the values."""
    source, arch = _split(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if source != "tv" and num_classes is None:
        # timm heads follow the tag's dataset: 21k classes, or none at all for feature-only tags (SigLIP, DINOv3).
        # A 1000-class head is always there to find and replace; timm then skips the checkpoint's head.
        kwargs["num_classes"] = 1000
    if arch.startswith(HUB_PREFIX):
        files.prepare_hub_config(name)  # the architecture is in the repo's config.json, which timm fetches

    def construct() -> nn.Module:
        if source == "tv":
            member = tv_member(arch, weights) if weights else None
            with nullcontext() if load else _architecture_only():
                return get_model(arch, weights=member, **kwargs)
        if source == "py":
            return zoo.call(arch, kwargs["num_classes"])[0]
        full = f"{arch}.{weights}" if weights and weights != HUB_TAG else arch
        return _require_timm().create_model(full, pretrained=load, **kwargs)

    model = _on_meta(construct) if meta else construct()
    if not aux and getattr(model, "aux_logits", False) is True:
        drop_aux_heads(model, _head_paths(name)[1:])
    return model


@functools.lru_cache(maxsize=64)
def _skeleton(name: str, weights: str | None) -> nn.Module:
    model = _create(name, weights, meta=True)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            # BatchNorm keeps shapes and costs no counted FLOPs, but runs as a slow Python decomposition on meta:
            # skipping it makes every probe 2-3x faster.
            module.forward = _same
    return model


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@functools.cache
def _head_paths(name: str) -> tuple[str, ...]:
    source, arch = _split(name)
    if source == "py":
        _, named = _on_meta(lambda: zoo.call(arch, 1000))
        if named is not None:  # the factory said where its classifier is
            return (named,)
    with warnings.catch_warnings():  # GoogLeNet and Inception-v3 warn about their init when built without weights
        warnings.simplefilter("ignore", FutureWarning)
        return find_heads(name, lambda num_classes: _create(name, None, meta=True, num_classes=num_classes))
