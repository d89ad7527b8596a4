"""Weights kept and put back: a module's state as torch's own state dict carries it, module versions included.

A state dict is an OrderedDict whose `_metadata` attribute holds each submodule's `version`, which some loaders
need: torchvision's MNASNet refuses a state without one (`version should be set to 1 or 2 instead of None`), and
BatchNorm upgrades a state it takes for an old one. Copying the tensors into a new dict drops it; every path that
reloads weights (the best epoch, a saved model, a cell's state for resume) goes through here so that none does.

A state here is such an OrderedDict: `module.load_state_dict` takes it as it is.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bench.atomic import atomic_write
from bench.errors import BenchError

FORMAT = 1  # of the file `save` writes: {"format", "tensors", "metadata"}

State = OrderedDict  # OrderedDict[str, torch.Tensor] with `_metadata`, as nn.Module.state_dict() returns


class StateError(BenchError):
    """A saved state cannot be read, or does not belong to the module it is restored into."""


def metadata(state: Mapping) -> dict[str, dict]:
    """The module versions a state carries, by submodule prefix ("" is the root); {} when it carries none."""
    return {key: dict(value) for key, value in (getattr(state, "_metadata", None) or {}).items()}


def with_metadata(tensors: Mapping[str, torch.Tensor], versions: Mapping[str, Mapping] | None) -> State:
    """A state of these tensors carrying these module versions, as load_state_dict expects them."""
    state = OrderedDict(tensors)
    state._metadata = OrderedDict((key, dict(value)) for key, value in (versions or {}).items())
    return state


def _detached(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    # .cpu() of a CPU tensor is the tensor itself: without copy=True a kept state would go on training with the model
    return tensor.detach().to("cpu", copy=copy)


def full_state(module: nn.Module) -> State:
    """Every tensor of the state dict, as contiguous CPU copies of their own (tied weights no longer share
    storage, which safetensors refuses), with the module versions."""
    full = module.state_dict()
    return with_metadata({k: _detached(v, True).contiguous() for k, v in full.items()}, metadata(full))


def changing_state(module: nn.Module, *, copy: bool = True) -> State:
    """What training can change: trainable parameters and every buffer (BatchNorm's running statistics), detached
    on the CPU, with the module versions; a frozen backbone's weights never move. `copy=False` aliases the
    module's own CPU tensors, for a caller that writes them out at once (no transient copy in host memory)."""
    full = module.state_dict()
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers(remove_duplicate=False)}
    kept = {k: _detached(v, copy) for k, v in full.items() if k in trainable or k in buffers}
    return with_metadata(kept, metadata(full))


def pack(state: Mapping[str, torch.Tensor]) -> dict:
    """A plain dict of the state that torch.save writes and torch.load(weights_only=True) reads back whole, module
    versions included: for a caller that keeps a state inside a bigger checkpoint."""
    return {"format": FORMAT, "tensors": dict(state), "metadata": metadata(state)}


def unpack(payload: object, where: str = "the checkpoint") -> State:
    """The state `pack` made, from what torch.load read."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("tensors"), dict):
        found = f"format {payload.get('format')!r}" if isinstance(payload, dict) else type(payload).__name__
        raise StateError(f"{where} is not a weight state bench wrote (found {found}, expected format {FORMAT}); "
                         "delete it so the cell starts afresh")
    return with_metadata(payload["tensors"], payload.get("metadata"))


def save(path: Path, state: Mapping[str, torch.Tensor], *, sync: bool = True) -> None:
    """Write the state to `path` atomically (a temporary file beside it, then os.replace): a reader finds the old
    file or the new one, never half of one. `sync=False` skips the fsync, for a file that dies with the process."""
    atomic_write(Path(path), lambda out: torch.save(pack(state), out), sync=sync)


def load(path: Path) -> State:
    """The state `save` wrote, on the CPU, read with weights_only=True (a file could otherwise run code)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateError(f"weight state {path} not found; it is written by `save`, check the path") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated zip, bad header, not torch
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise StateError(f"weight state {path} cannot be read ({reason}); "
                         "delete it so the cell starts afresh") from None
    return unpack(payload, f"weight state {path}")


def restore(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = False) -> None:
    """Load `state` into `module` in place. Keys the state lacks keep their values (a frozen backbone), unless
    `strict`; a key the module lacks is an error. Module versions are the state's, and the module's own where the
    state carries none (a safetensors file, a state copied into a plain dict): the module was built by this code."""
    versions = {**metadata(module.state_dict()), **metadata(state)}
    try:
        result = module.load_state_dict(with_metadata(state, versions), strict=False)
    except RuntimeError as exc:  # shapes that differ: torch lists them all, one per line
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise StateError(f"the weight state does not fit the {type(module).__name__} it is restored into "
                         f"({first}); it was kept from another model or another version of bench") from None
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("unexpected", result.unexpected_keys),
                                   ("missing", result.missing_keys if strict else [])) if keys]
    if problems:
        raise StateError(f"the weight state does not fit the {type(module).__name__} it is restored into: "
                         f"{'; '.join(problems)}; it was kept from another model or another version of bench")
