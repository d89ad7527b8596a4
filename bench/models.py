"""Backbones by name, built for a cell: weights, new heads, freeze policies, resolution limits, FLOPs, input recipes.

The names and the building live in `bench.registry`; its `list_models` and `resolve` are here too.

A model's architecture always follows its weights (torchvision's ViT-H/14 SWAG weights make it a 518 px
network, Inception-v3's add an auxiliary classifier), whether or not they are loaded: `pretrained: false` is
the same network, randomly initialised. A checkpoint of your own (`weights: file.pth`) loads into the
architecture of the default weights, and its inputs follow their recipe.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench import weights as files
from bench import zoo
from bench.errors import ResolutionError, UnknownModelError, WeightsUnavailableError, close_matches
from bench.freeze import apply_freeze
from bench.heads import drop_aux_heads, install_heads
from bench.recipe import IMAGENET, INTERPOLATIONS, InputRecipe
from bench.registry import SOURCES, _canonical, _create, _head_paths, _require_timm, _skeleton, _split, meta_init
from bench.train import weightstate
from bench.registry import list_models, resolve  # noqa: F401  (callers use models.list_models / models.resolve)
from bench.suite import Cell
from bench.weights import HUB_PREFIX, HUB_TAG, downloading, is_cached, prepare, timm_cfg, tv_member

PY_NATIVE_SIDES = (224, 32, 64, 96, 128, 160, 256, 299, 384)  # a py: model's native size, unless it declares one


@dataclass(frozen=True)
class ModelInfo:
    name: str  # canonical: "tv:resnet18" or "timm:xception41"
    source: str  # "torchvision" | "timm"
    params_m: float  # parameters in millions at 1000 classes
    default_weights: str | None  # torchvision weights enum member, or timm pretrained tag
    native_resolution: int  # the side the default weights were trained at
    min_resolution: int  # smallest square side the model trains at
    fixed_resolution: bool  # True when only native_resolution works (ViT...)


@dataclass
class Backbone:
    model: nn.Module  # new head(s) installed, freeze policy applied
    head: nn.Module  # the main (new) classifier head, as installed in model
    head_paths: tuple[str, ...]  # dotted paths of every replaced head, main first
    trainable_params: int
    total_params: int
    frozen_layers: int
    total_layers: int  # parameterised layers of the backbone (heads excluded)
    weights: str | None  # weights actually loaded; None when pretrained is false
    recipe: InputRecipe = IMAGENET  # mean, std, interpolation of the architecture's weights (loaded or not)
    model_source_file: str | None = None  # py: models: the file that defines the factory
    model_source_sha256: str | None = None  # ... and its hash, as imported
    weights_sha256: str | None = None  # a weights file of your own (`weights: path`), as loaded

    def provenance(self) -> dict:
        """The row's columns saying which code and which weights file made this model."""
        return {"model_source_file": self.model_source_file, "model_source_sha256": self.model_source_sha256,
                "weights_sha256": self.weights_sha256}


# --- weights names ------------------------------------------------------------------------------------------------


def _arch_weights(name: str, weights: str | None) -> str | None:
    """The weights whose architecture `name` is built with: the one asked for, else the default (also for a
    weights file of your own, which is checked against that architecture here)."""
    source, arch = _split(name)
    if files.is_file_weights(weights):
        arch_weights = _arch_weights(name, None)
        _check_file(name, arch_weights, weights)
        return arch_weights
    if source == "py" or arch.startswith(HUB_PREFIX):
        if weights is not None:
            raise UnknownModelError(f"{name}: weights {weights!r} is not a file path; its weights are "
                                    f"{'its repo' if source == 'timm' else 'what its factory returns'}, or give a "
                                    f"checkpoint file such as weights: path/to/file.pth")
        return HUB_TAG if source == "timm" else None
    if source == "tv":
        return tv_member(arch, weights).name
    timm = _require_timm()
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    if weights is None:
        return timm_cfg(arch, None).tag if tags else None
    if weights not in tags:
        hint, valid = close_matches(weights, tags), ", ".join(tags) or "none (it has no pretrained weights)"
        raise UnknownModelError(f"{name}: unknown weights {weights!r}{hint}; valid weights are {valid}")
    return weights


# --- shapes: resolution and FLOPs ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _why_not(name: str, weights: str | None, resolution: int, train: bool = False) -> str | None:
    """Why the forward fails at this size (None when it runs), tried on the meta device.

    Eval mode tells whether a model trains at a size: train mode only adds the auxiliary heads, which build()
    drops where they cannot run. A batch of two, as norm layers refuse a single value per channel in training.
    """
    model = _skeleton(name, weights).train(train)
    try:
        with torch.no_grad():
            model(torch.empty(2, 3, resolution, resolution, device="meta"))
    except NotImplementedError:  # an op without a meta kernel, or reading values: says nothing about the size
        return None
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def _keeps_aux(name: str, weights: str | None, resolution: int) -> bool:
    """Whether the model has auxiliary heads (torchvision's aux_logits) that can run at this size.

    Inception-v3's needs 299 px: below that bench trains it without, as torchvision does when asked.
    """
    has_aux = getattr(_skeleton(name, weights), "aux_logits", False) is True
    return has_aux and _why_not(name, weights, resolution, train=True) is None


@functools.lru_cache(maxsize=256)
def _limits(name: str, weights: str | None) -> ModelInfo:
    source, arch = _split(name)
    skeleton = _skeleton(name, weights)
    if source == "tv":
        member = tv_member(arch, weights)
        native, hint = int(member.transforms().crop_size[0]), int(member.meta["min_size"][0])
    else:  # timm's pretrained_cfg, which a py: model may carry too
        cfg = getattr(skeleton, "pretrained_cfg", None) or {}
        native = int((cfg.get("input_size") or (0, 0, 0))[-1])
        hint = int((cfg.get("min_input_size") or (0, 0, 0))[-1])

    def accepts(size: int) -> bool:
        return size >= 1 and _why_not(name, weights, size) is None

    if not native:  # a py: model that does not say: the first common size it takes
        native = next((side for side in PY_NATIVE_SIDES if accepts(side)), PY_NATIVE_SIDES[0])
    fixed = not any(accepts(s) for s in (native - 1, native + 1, native // 2, native * 2))
    if fixed:
        smallest = native
    elif hint and accepts(hint) and not accepts(hint - 1):
        smallest = hint  # the library's own min_size, confirmed by two forwards
    elif accepts(1) and accepts(native // 2):  # not 1 alone: a 1x1 token grid broadcasts where larger ones fail
        smallest = 1
    else:  # binary search, assuming that above the smallest size every size works (true of convolutional nets)
        low, high = 2, hint if hint and accepts(hint) else native
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if accepts(middle) else (middle + 1, high)
        smallest = low
    params_m = sum(p.numel() for p in skeleton.parameters()) / 1e6
    return ModelInfo(name, SOURCES[source], params_m, weights, native, smallest, fixed)


def info(name: str) -> ModelInfo:
    """Parameters, default weights and resolution limits, from a skeleton: cheap, never downloads."""
    name = _canonical(name)
    return _limits(name, _arch_weights(name, None))


def check_resolution(name: str, resolution: int, *, weights: str | None = None) -> None:
    """Raise ResolutionError unless a training step of the model runs at resolution x resolution."""
    name = _canonical(name)
    arch_weights = _arch_weights(name, weights)
    why = _why_not(name, arch_weights, resolution)
    if why is None:
        return
    limits = _limits(name, arch_weights)
    if limits.fixed_resolution and _why_not(name, arch_weights, limits.native_resolution) is None:
        reason = f"it takes only its native {limits.native_resolution} px"
    elif resolution < limits.min_resolution:
        reason = f"it needs at least {limits.min_resolution} px (native {limits.native_resolution})"
    else:
        reason = f"its forward pass fails at that size ({why}); its native size is {limits.native_resolution} px"
    raise ResolutionError(f"{name} cannot take {resolution} px: {reason}; pick another resolution or model")


@functools.lru_cache(maxsize=1024)
def _flops(name: str, weights: str | None, resolution: int, num_classes: int) -> int:
    model = copy.deepcopy(_skeleton(name, weights))
    with meta_init():
        install_heads(model, _head_paths(name), num_classes, None)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty(1, 3, resolution, resolution, device="meta"))
    return int(counter.get_total_flops())


def flops_per_image(name: str, resolution: int, num_classes: int = 10, *, weights: str | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) for one image in eval mode with a linear head of num_classes."""
    check_resolution(name, resolution, weights=weights)
    name = _canonical(name)
    return _flops(name, _arch_weights(name, weights), resolution, num_classes)


# --- input recipe ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _recipe(name: str, weights: str | None) -> InputRecipe:
    source, arch = _split(name)
    if source == "tv":
        member = tv_member(arch, weights)
        preset = member.transforms()  # ImageClassification: crop_size, resize_size, mean, std, interpolation
        crop, resize = getattr(preset, "crop_size", None), getattr(preset, "resize_size", None)
        return InputRecipe(
            mean=tuple(float(v) for v in preset.mean), std=tuple(float(v) for v in preset.std),
            interpolation=preset.interpolation.value,
            crop_pct=round(crop[0] / resize[0], 4) if crop and resize else None,
            source=f"torchvision {type(member).__name__}.{member.name}.transforms()",
        )
    if source == "py":
        return _declared_recipe(name, getattr(_skeleton(name, weights), "pretrained_cfg", None) or {})
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(_skeleton(name, weights))
    interpolation = config.get("interpolation", "bilinear")
    return InputRecipe(
        mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
        # timm's "random" (train-time choice between bilinear and bicubic) has no single meaning here
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
        crop_pct=float(config["crop_pct"]) if config.get("crop_pct") else None,
        source=f"timm resolve_model_data_config({arch}{'.' + weights if weights and weights != HUB_TAG else ''})",
    )


def _declared_recipe(name: str, cfg: dict) -> InputRecipe:
    """A py: model's recipe: what its `pretrained_cfg` says (timm's keys), ImageNet's statistics otherwise."""
    if cfg.get("mean") is None and cfg.get("std") is None:
        return replace(IMAGENET, source=f"ImageNet statistics ({name} declares none)")
    interpolation = cfg.get("interpolation", "bilinear")
    return InputRecipe(
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET.mean)), std=tuple(float(v) for v in cfg.get("std", IMAGENET.std)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
        crop_pct=float(cfg["crop_pct"]) if cfg.get("crop_pct") else None, source=f"{name}: its model's pretrained_cfg",
    )


def input_recipe(name: str, weights: str | None = None) -> InputRecipe:
    """The input recipe of the weights the architecture is built with (the default weights when none are named),
    whether or not they are loaded: a random-init baseline sees its pretrained twin's inputs."""
    name = _canonical(name)
    return _recipe(name, _arch_weights(name, weights))


def cell_recipe(cell: Cell) -> InputRecipe:
    """The cell's input recipe: its weights' (`input_recipe`), with the suite's `input_mean` / `input_std` over it."""
    return input_recipe(cell.model, cell.weights).with_stats(cell.input_mean, cell.input_std)


# --- weights -----------------------------------------------------------------------------------------------------


def _load(name: str, weights: str | None, aux: bool = True) -> nn.Module:
    """The model with its pretrained weights, through the library's own loader."""
    if weights is None:
        raise WeightsUnavailableError(f"{name} has no pretrained weights; set pretrained: false or pick another model")
    prepare(name, weights)
    with downloading(name, weights):  # timm downloads as it loads; huggingface_hub may still give up
        return _create(name, weights, meta=False, load=True, aux=aux)


def fetch_weights(name: str, weights: str | None = None) -> Path:
    """Download a model's weights (default: its default weights) into the library cache; return where they are."""
    name = _canonical(name)
    arch_weights = _arch_weights(name, weights)
    if arch_weights is None:
        raise WeightsUnavailableError(f"{name} has no pretrained weights to fetch; use it with pretrained: false")
    path = prepare(name, arch_weights)
    if not is_cached(name, arch_weights):
        _load(name, arch_weights)  # timm fills its cache as it loads
    return path


# --- weights files of your own -------------------------------------------------------------------------------------


def _spare(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a checkpoint may leave out: the heads bench replaces, and the auxiliary branches around them."""
    heads = _head_paths(name)
    return heads, tuple(dict.fromkeys(path.split(".")[0] for path in heads[1:]))


def _fit(name: str, model: nn.Module, path: Path, where: str, mmap: bool) -> dict[str, torch.Tensor]:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    return files.fit_state_dict(files.read_state_dict(path, mmap), expected, *_spare(name), where)


@functools.lru_cache(maxsize=64)
def _checked(name: str, arch_weights: str | None, path: Path, stamp: tuple[int, int]) -> None:
    _fit(name, _skeleton(name, arch_weights), path, f"{name} weights {path}", mmap=True)


def _check_file(name: str, arch_weights: str | None, weights: str) -> None:
    """A weights file exists and fits the architecture (keys and shapes, read memory-mapped): `bench validate`
    says so before a cell starts."""
    path = files.checkpoint_file(weights).resolve()
    stat = path.stat()
    _checked(name, arch_weights, path, (stat.st_mtime_ns, stat.st_size))


def _with_weights(cell: Cell, name: str, arch_weights: str | None, aux: bool) -> tuple[nn.Module, str | None]:
    """The architecture with the cell's weights (a library's, a file of your own, or for a py: model without a
    file, the factory's model as it comes) and the sha256 of a weights file."""
    library = not files.is_file_weights(cell.weights) and _split(name)[0] != "py"
    if not cell.pretrained or (not library and cell.weights is None):
        return _create(name, arch_weights, meta=False, aux=aux), None
    if library:
        return _load(name, arch_weights, aux), None
    model = _create(name, arch_weights, meta=False)  # every branch: the checkpoint may hold the auxiliary ones
    path = files.checkpoint_file(cell.weights)
    # through weightstate: a file carries no module versions, and MNASNet refuses a state without its own
    weightstate.restore(model, _fit(name, model, path, f"{name} weights {cell.weights}", mmap=False))
    if not aux and getattr(model, "aux_logits", False) is True:
        drop_aux_heads(model, _head_paths(name)[1:])
    return model, files.file_sha256(path)


# --- build --------------------------------------------------------------------------------------------------------


def build(cell: Cell, num_classes: int) -> Backbone:
    """The cell's backbone on the CPU: weights loaded (when pretrained), new head(s), freeze policy applied."""
    name = _canonical(cell.model)
    arch_weights = _arch_weights(name, cell.weights)
    check_resolution(name, cell.resolution, weights=cell.weights)
    aux = _keeps_aux(name, arch_weights, cell.resolution)
    model, weights_sha256 = _with_weights(cell, name, arch_weights, aux)
    paths = install_heads(model, _head_paths(name), num_classes, cell)
    frozen, total = apply_freeze(model, paths, cell.freeze)
    factory = zoo.load(_split(name)[1]) if _split(name)[0] == "py" else None
    loaded = cell.weights if weights_sha256 else None if factory else arch_weights
    return Backbone(
        model=model,
        head=model.get_submodule(paths[0]),
        head_paths=paths,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        frozen_layers=frozen,
        total_layers=total,
        weights=loaded if cell.pretrained else None,
        recipe=_recipe(name, arch_weights).with_stats(cell.input_mean, cell.input_std),
        model_source_file=str(factory.source_file) if factory else None,
        model_source_sha256=factory.source_sha256 if factory else None,
        weights_sha256=weights_sha256,
    )
